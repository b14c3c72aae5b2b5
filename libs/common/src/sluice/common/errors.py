"""The one exception tree of Sluice, and how each error maps to a gRPC status.

::

    SluiceError                      INTERNAL
    ├── ConfigError                  (start-up only: a setting or file is wrong)
    ├── InvalidArgument              INVALID_ARGUMENT + google.rpc.BadRequest field violations
    ├── NotFound                     NOT_FOUND
    ├── AlreadyExists                ALREADY_EXISTS
    ├── FailedPrecondition           FAILED_PRECONDITION
    ├── ResourceExhausted            RESOURCE_EXHAUSTED + google.rpc.RetryInfo
    └── Unavailable                  UNAVAILABLE (a dependency is down; safe to retry)
                                     + google.rpc.RetryInfo when it says when

Third-party exceptions are wrapped once, where the third party is called, with
``raise ... from exc``. The server interceptor in :mod:`sluice.common.grpcserver` turns
these into statuses carrying ``google.rpc.ErrorInfo`` (reason and domain ``sluice.dev``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc

ERROR_DOMAIN = "sluice.dev"


class SluiceError(Exception):
    """Base of every error Sluice raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class ConfigError(SluiceError):
    """A setting or configuration file is missing or wrong; raised at start-up."""

    reason = "CONFIG"


class InvalidArgument(SluiceError):
    """The request is malformed; ``field_violations`` says which fields and why."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        field_violations: Iterable[tuple[str, str]] = (),
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.field_violations: list[tuple[str, str]] = list(field_violations)


class NotFound(SluiceError):
    """The named resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(SluiceError):
    """The resource exists with different content (e.g. idempotency key reuse)."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(SluiceError):
    """The system is not in a state where the request can be done."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(SluiceError):
    """A quota or rate limit refuses the request for now; retry after ``retry_after`` s."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, retry_after: float, *, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after = retry_after


class Unavailable(SluiceError):
    """A dependency (database, Redis, another service) is down; safe to retry, after
    ``retry_after`` seconds when that is set (sent as ``google.rpc.RetryInfo``)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"

    def __init__(
        self, message: str, *, retry_after: float = 0.0, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after = retry_after
