"""Why a webhook request was refused, as one exception the HTTP layer turns into a status."""

from __future__ import annotations


class WebhookRejected(Exception):
    """A request that must not touch any state.

    ``status`` is the HTTP answer (401 for a bad or missing signature, 400 for a stale,
    malformed or unexpected request) and ``reason`` a short label for the counters
    (``forged``, ``stale``, ``malformed``, ``topic``, ``unconfigured``...).
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def forged(message: str) -> WebhookRejected:
    return WebhookRejected(401, "forged", message)


def stale(message: str) -> WebhookRejected:
    return WebhookRejected(400, "stale", message)


def malformed(message: str) -> WebhookRejected:
    return WebhookRejected(400, "malformed", message)
