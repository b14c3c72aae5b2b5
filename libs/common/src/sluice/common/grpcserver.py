"""gRPC server runtime shared by the three services.

:func:`build_server` makes a ``grpc.aio`` server with tracing and error interceptors,
``grpc.health.v1`` health and server reflection; :class:`ServerHandle` starts it and stops
it in a bounded sequence: health NOT_SERVING first (so load balancers and probes move
away), then stop accepting and drain in-flight calls for up to the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from sluice.common.errors import (
    ERROR_DOMAIN,
    InvalidArgument,
    ResourceExhausted,
    SluiceError,
    Unavailable,
)
from sluice.common.logging import bind_request_id, reset_request_id
from sluice.common.telemetry import Telemetry

log = logging.getLogger("sluice.grpc")

# Large batches travel in one message: SendBatch of 1,000 rendered-later messages with their
# variables stays far below this.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # Clients re-resolve DNS only when a connection ends: closing connections every few
    # minutes lets routers find sender pods added by a scale-up (headless Service).
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
)


def error_status(exc: SluiceError) -> status_pb2.Status:
    """The ``google.rpc.Status`` (with ErrorInfo and typed details) for a Sluice error."""
    status = status_pb2.Status(code=exc.code.value[0], message=exc.message)
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN)
    info.metadata.update(exc.metadata)
    status.details.add().Pack(info)
    if isinstance(exc, InvalidArgument) and exc.field_violations:
        bad = error_details_pb2.BadRequest()
        for field, description in exc.field_violations:
            bad.field_violations.add(field=field, description=description)
        status.details.add().Pack(bad)
    if isinstance(exc, ResourceExhausted) or (isinstance(exc, Unavailable) and exc.retry_after):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.CopyFrom(duration_from_seconds(exc.retry_after))
        status.details.add().Pack(retry)
    return status


def duration_from_seconds(seconds: float) -> duration_pb2.Duration:
    """A protobuf Duration from float seconds (negative values clamp to zero)."""
    seconds = max(0.0, seconds)
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps :class:`SluiceError` to rich gRPC statuses and hides unexpected errors.

    It also binds a request id (the caller's ``x-request-id`` metadata, or a new one) to the
    logging context and logs every call's method, status and duration at DEBUG.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        inner = handler.unary_unary

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex[:16])
            token = bind_request_id(request_id)
            started = time.perf_counter()
            outcome = "OK"
            try:
                return await inner(request, context)
            except SluiceError as exc:
                outcome = exc.code.name
                status = error_status(exc)
                await context.abort(
                    exc.code,
                    exc.message,
                    trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
                )
            except (asyncio.CancelledError, grpc.aio.AbortError):
                outcome = "ABORTED_OR_CANCELLED"
                raise
            except Exception:
                outcome = "INTERNAL"
                log.exception("unhandled error in %s", method)
                status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"internal error (request id {request_id})",
                    trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
                )
            finally:
                log.debug(
                    "rpc %s %s in %.1f ms",
                    method,
                    outcome,
                    (time.perf_counter() - started) * 1000,
                )
                reset_request_id(token)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def build_server(telemetry: Telemetry) -> grpc.aio.Server:
    """A ``grpc.aio`` server with the tracing and error interceptors installed."""
    return grpc.aio.server(
        interceptors=[*telemetry.server_interceptors(), ErrorInterceptor()],
        options=list(SERVER_OPTIONS),
    )


class ServerHandle:
    """One running gRPC server with health and reflection, and its bounded shutdown."""

    def __init__(self, server: grpc.aio.Server, service_names: Iterable[str]) -> None:
        self.server = server
        self.service_names = tuple(service_names)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                *self.service_names,
                reflection.SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            ),
            server,
        )
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Binds, starts and marks every service SERVING; returns the bound port."""
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"could not bind gRPC server to {host}:{port}")
        await self.server.start()
        await self.set_serving(True)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Sets the overall status and every service's status at once."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING first, then stop accepting and drain in-flight calls for ``grace`` s."""
        await self.set_serving(False)
        await self.server.stop(grace)


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (a second signal is left to the default handler)."""
    loop = asyncio.get_running_loop()

    def handler(signum: int) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()
        loop.remove_signal_handler(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler, sig)
