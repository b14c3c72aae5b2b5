"""A local Resend: ``POST /emails`` and ``POST /emails/batch`` as Resend documents them.

Written from Resend's API reference: bearer API key (401 ``missing_api_key``, 403
``invalid_api_key``); required ``from``/``to``/``subject`` and a body (422
``missing_required_field``), at most 50 recipients, tags of ASCII letters, digits, ``_``
and ``-`` (422 ``validation_error``); batches of 1 to 100 without attachments or
``scheduled_at``, validated ``strict`` (one bad email fails the call) or ``permissive``
(``x-batch-validation``: the good ones are sent, the bad listed in ``errors`` by index);
a per-second request limit with ``ratelimit-*`` headers on every answer and 429
``rate_limit_exceeded`` with ``retry-after``; a daily email quota (429
``daily_quota_exceeded``); ``Idempotency-Key`` of 1-256 characters (400
``invalid_idempotency_key``) remembered for 24 hours: the same key and body answer the
first result again without sending, the same key with another body is 409
``invalid_idempotent_request``, and while the first is in progress 409
``concurrent_idempotent_requests``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from typing import Any

from aiohttp import web

from tests.fakes.http_base import FakeHttpServer

_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")
_NAMED = re.compile(r"^[^<>]*<([^<>]+)>$")
_TAG = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


class ValidationFailure(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


def _address(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    named = _NAMED.match(value.strip())
    return bool(_ADDRESS.match(named.group(1) if named else value.strip()))


class FakeResend(FakeHttpServer):
    def __init__(
        self,
        api_key: str = "re_test",
        requests_per_second: int = 0,
        daily_quota: int = 0,
        processing_seconds: float = 0.0,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.requests_per_second = requests_per_second
        self.daily_quota = daily_quota
        self.processing_seconds = processing_seconds
        self.emails: list[dict[str, Any]] = []  # every email sent, with its "id"
        self._idempotency: dict[str, tuple[str, int, Any]] = {}
        self._in_flight: set[str] = set()
        self.app.router.add_post("/emails", self._single)
        self.app.router.add_post("/emails/batch", self._batch)

    def _error(self, status: int, name: str, message: str, headers: dict[str, str]) -> web.Response:
        body = {"statusCode": status, "name": name, "message": message}
        return web.json_response(body, status=status, headers=headers)

    async def _single(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, batch=False)

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, batch=True)

    async def _handle(self, request: web.Request, *, batch: bool) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": raw})
        allowed, remaining, reset = self.take_window(self.requests_per_second)
        headers = {}
        if self.requests_per_second:
            headers = {
                "ratelimit-limit": str(self.requests_per_second),
                "ratelimit-remaining": str(remaining),
                "ratelimit-reset": str(max(1, round(reset))),
            }
        auth = request.headers.get("Authorization", "")
        if not auth:
            return self._error(401, "missing_api_key", "Missing API key", headers)
        if auth != f"Bearer {self.api_key}":
            return self._error(403, "invalid_api_key", "API key is invalid", headers)
        if not allowed:
            headers["retry-after"] = str(max(1, round(reset)))
            return self._error(429, "rate_limit_exceeded", "Too many requests", headers)
        if self.status_next:
            status = self.status_next.pop(0)
            return self._error(status, "application_error", "injected", headers)
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 1 <= len(key) <= 256:
            return self._error(
                400, "invalid_idempotency_key", "The key must be between 1-256 chars.", headers
            )
        digest = hashlib.sha256(request.path.encode() + raw).hexdigest()
        if key is not None:
            if key in self._in_flight:
                return self._error(
                    409,
                    "concurrent_idempotent_requests",
                    "Same idempotency key request is still in progress",
                    headers,
                )
            seen = self._idempotency.get(key)
            if seen is not None:
                if seen[0] != digest:
                    return self._error(
                        409,
                        "invalid_idempotent_request",
                        "Same idempotency key used with a different payload",
                        headers,
                    )
                response = web.json_response(seen[2], status=seen[1], headers=headers)
                return await self.after(request, response)
            self._in_flight.add(key)
        try:
            if self.processing_seconds:
                await asyncio.sleep(self.processing_seconds)
            status, body = self._process(raw, batch, request.headers.get("x-batch-validation"))
        finally:
            if key is not None:
                self._in_flight.discard(key)
        if key is not None and status == 200:
            self._idempotency[key] = (digest, status, body)
        if status != 200:
            return self._error(status, body["name"], body["message"], headers)
        return await self.after(request, web.json_response(body, headers=headers))

    def _process(self, raw: bytes, batch: bool, mode: str | None) -> tuple[int, Any]:
        try:
            document = json.loads(raw)
        except ValueError:
            return 422, {"name": "validation_error", "message": "Invalid JSON"}
        if not batch:
            try:
                self._validate(document, batch=False)
            except ValidationFailure as exc:
                return 422, {"name": exc.name, "message": exc.message}
            if not self._quota_allows(1):
                return 429, {"name": "daily_quota_exceeded", "message": "Daily quota exceeded"}
            return 200, {"id": self._send(document)}
        if not isinstance(document, list) or not 1 <= len(document) <= 100:
            return 422, {
                "name": "validation_error",
                "message": "The batch must have between 1 and 100 emails",
            }
        if mode not in (None, "strict", "permissive"):
            return 422, {"name": "validation_error", "message": "Invalid batch validation mode"}
        failures: dict[int, ValidationFailure] = {}
        for i, item in enumerate(document):
            try:
                self._validate(item, batch=True)
            except ValidationFailure as exc:
                failures[i] = exc
        if failures and mode != "permissive":
            first = failures[min(failures)]
            return 422, {"name": first.name, "message": first.message}
        good = [item for i, item in enumerate(document) if i not in failures]
        if not self._quota_allows(len(good)):
            return 429, {"name": "daily_quota_exceeded", "message": "Daily quota exceeded"}
        body: dict[str, Any] = {"data": [{"id": self._send(item)} for item in good]}
        if mode == "permissive":
            body["errors"] = [
                {"index": i, "message": f.message} for i, f in sorted(failures.items())
            ]
        return 200, body

    def _quota_allows(self, n: int) -> bool:
        return not self.daily_quota or len(self.emails) + n <= self.daily_quota

    def _send(self, item: dict[str, Any]) -> str:
        email_id = str(uuid.uuid4())
        self.emails.append({**item, "id": email_id})
        return email_id

    def _validate(self, item: Any, *, batch: bool) -> None:
        if not isinstance(item, dict):
            raise ValidationFailure("validation_error", "Each email must be an object")
        for key in ("from", "to", "subject"):
            if not item.get(key):
                raise ValidationFailure("missing_required_field", f"Missing `{key}` field.")
        if not (item.get("html") or item.get("text")):
            raise ValidationFailure("missing_required_field", "Missing `html` or `text` field.")
        if not _address(item["from"]):
            raise ValidationFailure("invalid_from_address", "Invalid `from` field.")
        to = item["to"] if isinstance(item["to"], list) else [item["to"]]
        if len(to) > 50:
            raise ValidationFailure("validation_error", "Too many recipients, max 50")
        if not all(_address(a) for a in to):
            raise ValidationFailure("validation_error", "Invalid `to` field.")
        reply_to = item.get("reply_to", [])
        for a in reply_to if isinstance(reply_to, list) else [reply_to]:
            if not _address(a):
                raise ValidationFailure("validation_error", "Invalid `reply_to` field.")
        for tag in item.get("tags", []):
            if not (
                isinstance(tag, dict)
                and _TAG.match(str(tag.get("name", "")))
                and _TAG.match(str(tag.get("value", "")))
            ):
                raise ValidationFailure("validation_error", "Invalid tag")
        headers = item.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ValidationFailure("validation_error", "Invalid `headers` field.")
        if batch and ("attachments" in item or "scheduled_at" in item):
            raise ValidationFailure(
                "validation_error", "attachments and scheduled_at are not supported in batch"
            )
