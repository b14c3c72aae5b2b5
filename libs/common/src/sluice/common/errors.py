"""The one exception tree of Sluice, and how each error maps to a gRPC status.

::

    SluiceError                      INTERNAL
    ├── ConfigError                  (start-up only: a setting or file is wrong)
    ├── InvalidArgument              INVALID_ARGUMENT + google.rpc.BadRequest field violations
    ├── NotFound                     NOT_FOUND
    ├── AlreadyExists                ALREADY_EXISTS
    ├── FailedPrecondition           FAILED_PRECONDITION
    ├── ResourceExhausted            RESOURCE_EXHAUSTED + google.rpc.RetryInfo
    ├── Unavailable                  UNAVAILABLE (a dependency is down; safe to retry)
    ├── Unauthenticated              UNAUTHENTICATED
    └── PermissionDenied             PERMISSION_DENIED

Third-party exceptions are wrapped once, where the third party is called, with
``raise ... from exc`` (``sluice.common.db.db_boundary`` for PostgreSQL, the Redis users'
own ``except RedisError``). :func:`rpc_status` is the one mapping from an error to a gRPC
status carrying ``google.rpc.ErrorInfo`` (reason and domain ``sluice.dev``) and typed
details; :func:`http_status` the same for the HTTP listeners. The server interceptor in
:mod:`sluice.common.grpcserver` applies it to every call of every shape.

What an error quotes is bounded (message, field names, descriptions, metadata), so input
echoed into an error can never push the status trailer past a client's metadata limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

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
    ``retry_after`` seconds when it is known (0 = unknown)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = 0.0,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after = retry_after


class Unauthenticated(SluiceError):
    """No valid credentials came with the call."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(SluiceError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


# Bounds on what one error quotes: the whole status stays below ~4.5 KiB, far from gRPC's
# 8 KiB soft and 16 KiB hard metadata limits, whatever the input was.
MAX_MESSAGE_CHARS = 512
MAX_FIELD_CHARS = 100
MAX_DESCRIPTION_CHARS = 200
MAX_VIOLATIONS = 10
MAX_METADATA_CHARS = 200
MAX_METADATA_ENTRIES = 5

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked when cut."""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 14)] + f"...(+{len(text) - limit + 14} chars)"


def duration_from_seconds(seconds: float) -> duration_pb2.Duration:
    """A protobuf Duration from float seconds (negative values clamp to zero)."""
    seconds = max(0.0, seconds)
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code of an error: its own for Sluice errors, INTERNAL (a bug) otherwise."""
    if isinstance(exc, SluiceError) and not isinstance(exc, ConfigError):
        return exc.code
    return grpc.StatusCode.INTERNAL


def rpc_status(exc: BaseException, *, request_id: str = "") -> status_pb2.Status:
    """The ``google.rpc.Status`` for any error: code, bounded message, ErrorInfo, and
    BadRequest field violations or RetryInfo where the error carries them.

    Anything that is not a Sluice error is a bug: INTERNAL, with nothing of it exposed but
    the request id to find it in the logs.
    """
    code = status_code(exc)
    if code is grpc.StatusCode.INTERNAL or not isinstance(exc, SluiceError):
        suffix = f" (request id {request_id})" if request_id else ""
        status = status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error{suffix}")
        info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN)
        status.details.add().Pack(info)
        return status
    status = status_pb2.Status(code=code.value[0], message=clip(exc.message, MAX_MESSAGE_CHARS))
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN)
    for key, value in list(exc.metadata.items())[:MAX_METADATA_ENTRIES]:
        info.metadata[clip(key, MAX_FIELD_CHARS)] = clip(value, MAX_METADATA_CHARS)
    status.details.add().Pack(info)
    if isinstance(exc, InvalidArgument) and exc.field_violations:
        bad = error_details_pb2.BadRequest()
        for field, description in exc.field_violations[:MAX_VIOLATIONS]:
            bad.field_violations.add(
                field=clip(field, MAX_FIELD_CHARS),
                description=clip(description, MAX_DESCRIPTION_CHARS),
            )
        status.details.add().Pack(bad)
    if isinstance(exc, ResourceExhausted | Unavailable) and getattr(exc, "retry_after", None):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.CopyFrom(duration_from_seconds(float(exc.retry_after)))
        status.details.add().Pack(retry)
    return status


def http_status(exc: BaseException) -> int:
    """The HTTP status for an error, for the HTTP listeners (500 for bugs)."""
    return _HTTP_STATUS.get(status_code(exc), 500)
