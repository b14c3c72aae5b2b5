"""gRPC server runtime shared by the three services.

:class:`GrpcListener` is a service's gRPC listener: a ``grpc.aio`` server with the
tracing and error interceptors, ``grpc.health.v1`` health and (optionally) server
reflection, started and stopped as one :class:`~sluice.common.service.Listener` of a
:class:`~sluice.common.service.Service`. It also tells how many calls wait in gRPC core for
the process to take them up (:meth:`GrpcListener.waiting_calls`), which admission control
reads: such calls are invisible to any count the process keeps.

:class:`ErrorInterceptor` covers all four RPC shapes. For every call it binds a request id
to the logging context, maps any error to a status with :func:`sluice.common.errors.rpc_status`
(a Sluice error to its code and details; anything else is a bug: INTERNAL, logged with its
traceback), answers a request that is not valid protobuf (or not valid UTF-8 in a string
field) with INVALID_ARGUMENT instead of gRPC's UNKNOWN, and records the call in the RPC
metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc._cython import cygrpc  # channelz, the one view of calls core still holds
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from sluice.common.errors import (
    InvalidArgument,
    SluiceError,
    duration_from_seconds,
    rpc_status,
    status_code,
)
from sluice.common.logging import bind_request_id, reset_request_id
from sluice.common.metrics import Metrics
from sluice.common.service import ListenError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_PENDING_CALLS",
    "SERVER_OPTIONS",
    "ErrorInterceptor",
    "GrpcListener",
    "duration_from_seconds",
    "install_stop_signals",
]

log = logging.getLogger("sluice.grpc")

# Large batches travel in one message: SendBatch of 1,000 rendered-later messages with their
# variables stays far below this.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
#: Calls gRPC core holds for the process before the process takes them up (it takes them one
#: at a time, so a burst waits there). By default core refuses them at random from 1,000 on
#: and always from 3,000, and a refused call ends CANCELLED, a code that tells a client
#: nothing (it never reached the service, whose admission answers RESOURCE_EXHAUSTED with a
#: retry hint). One fixed bound instead: the same memory bound as the default, and no call
#: refused below it.
MAX_PENDING_CALLS = 3_000
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # Clients re-resolve DNS only when a connection ends: closing connections every few
    # minutes lets routers find sender pods added by a scale-up (headless Service).
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
)


class _Undecodable:
    """What the guarded deserializer hands on for bytes that are not the request type."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _guarded(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any decode failure is the caller's bad bytes
            return _Undecodable(exc)

    return deserialize


def _check(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(
            "the request is not a valid protobuf message of this method's type "
            "(or a string field is not valid UTF-8)",
            [("request", "not decodable")],
        )
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _check(request)


class _Call:
    """Bookkeeping of one intercepted call: request id, timing, outcome, error mapping."""

    def __init__(self, factory: _CallFactory) -> None:
        self.method = factory.method
        self.metrics = factory.metrics
        self.request_id = str(factory.metadata.get("x-request-id") or uuid.uuid4().hex[:16])
        self.code = "OK"
        self.started = time.perf_counter()
        self.token = bind_request_id(self.request_id)
        self._taken = factory.taken
        self._taken.active += 1

    async def fail(self, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        """Aborts the call with the status ``exc`` maps to (never returns)."""
        code = status_code(exc)
        self.code = code.name
        if not isinstance(exc, SluiceError) or code is grpc.StatusCode.INTERNAL:
            log.error("unhandled error in %s", self.method, exc_info=exc)
        status = rpc_status(exc, request_id=self.request_id)
        await context.abort(
            code,
            status.message,
            trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
        )

    def finish(self) -> None:
        elapsed = time.perf_counter() - self.started
        if self.metrics is not None:
            self.metrics.observe_rpc(self.method, self.code, elapsed)
        log.debug("rpc %s %s in %.1f ms", self.method, self.code, elapsed * 1000)
        reset_request_id(self.token)
        self._taken.active -= 1


class _Taken:
    """Calls the process has taken up from gRPC core and not finished, all methods."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = 0


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps errors to rich statuses for all four RPC shapes; see the module docstring."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self.taken = _Taken()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        call = _CallFactory(
            handler_call_details.method,
            dict(handler_call_details.invocation_metadata or ()),
            self._metrics,
            self.taken,
        )
        codecs = (_guarded(handler.request_deserializer), handler.response_serializer)
        if handler.unary_unary is not None:
            behaviour = _unary_response(handler.unary_unary, call, _check)
            return grpc.unary_unary_rpc_method_handler(behaviour, *codecs)
        if handler.stream_unary is not None:
            behaviour = _unary_response(handler.stream_unary, call, _checked_stream)
            return grpc.stream_unary_rpc_method_handler(behaviour, *codecs)
        if handler.unary_stream is not None:
            behaviour = _streamed_responses(handler.unary_stream, call, _check)
            return grpc.unary_stream_rpc_method_handler(behaviour, *codecs)
        if handler.stream_stream is not None:
            behaviour = _streamed_responses(handler.stream_stream, call, _checked_stream)
            return grpc.stream_stream_rpc_method_handler(behaviour, *codecs)
        return handler


class _CallFactory:
    """What every call of one intercepted method shares; makes a :class:`_Call` each time."""

    def __init__(
        self, method: str, metadata: dict[str, Any], metrics: Metrics | None, taken: _Taken
    ) -> None:
        self.method, self.metadata, self.metrics, self.taken = method, metadata, metrics, taken

    def __call__(self) -> _Call:
        return _Call(self)


# The request side of each shape: one message is checked, a stream is checked as it is read.
_Adapt = Callable[[Any], Any]


def _unary_response(inner: Any, new_call: _CallFactory, adapt: _Adapt) -> Any:
    """Wraps a behaviour that answers one response (unary-unary, stream-unary)."""

    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = new_call()
        try:
            return await inner(adapt(request), context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            call.code = "CANCELLED_OR_ABORTED"
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status; bugs are INTERNAL
            await call.fail(exc, context)
        finally:
            call.finish()

    return behaviour


def _streamed_responses(inner: Any, new_call: _CallFactory, adapt: _Adapt) -> Any:
    """Wraps a behaviour that streams responses (unary-stream, stream-stream)."""

    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = new_call()
        try:
            async for response in _responses(inner(adapt(request), context)):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit):
            call.code = "CANCELLED_OR_ABORTED"
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status; bugs are INTERNAL
            await call.fail(exc, context)
        finally:
            call.finish()

    return behaviour


async def _responses(behaviour: Any) -> AsyncIterator[Any]:
    """The responses of a streaming behaviour: an async generator, or a coroutine that
    writes with ``context.write`` and yields nothing here."""
    if hasattr(behaviour, "__aiter__"):
        async for response in behaviour:
            yield response
    else:
        await behaviour


class GrpcListener:
    """A service's gRPC server with health, reflection and the shared interceptors."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        service_names: Iterable[str],
        interceptors: Sequence[Any] = (),
        inner_interceptors: Sequence[Any] = (),
        metrics: Metrics | None = None,
        reflection_enabled: bool = True,
        credentials: grpc.ServerCredentials | None = None,
        options: Sequence[tuple[str, Any]] = SERVER_OPTIONS,
        name: str = "grpc",
    ) -> None:
        self._name = name
        self.host = host
        self._requested_port = port
        self._port = 0
        self._credentials = credentials
        # Tracing first (it opens the span), then the error interceptor, then the inner
        # ones (auth): their refusals are raised inside the error interceptor, so they are
        # mapped and counted like every other error.
        self._errors = ErrorInterceptor(metrics)
        self.server = grpc.aio.server(
            interceptors=[*interceptors, self._errors, *inner_interceptors],
            options=list(options),
        )
        self._channelz_id = _newest_channelz_server()
        self.service_names = tuple(service_names)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if reflection_enabled:
            reflection.enable_server_reflection(
                (
                    *self.service_names,
                    reflection.SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                ),
                self.server,
            )

    @property
    def name(self) -> str:
        """The listener's label."""
        return self._name

    @property
    def port(self) -> int:
        """The bound port (0 before start)."""
        return self._port

    def waiting_calls(self) -> int | None:
        """Calls that reached this server and that the process has not taken up yet: they
        wait in gRPC core, where no count of started calls sees them (None: unknown).

        Read from gRPC's channelz counters (calls started, minus those finished, minus
        those the process is working on): about 0.1 ms a reading."""
        if self._channelz_id is None:
            return None
        try:
            data = json.loads(cygrpc.channelz_get_server(self._channelz_id))["server"]["data"]
            done = int(data.get("callsSucceeded", 0)) + int(data.get("callsFailed", 0))
            started = int(data.get("callsStarted", 0))
        except Exception:  # noqa: BLE001 - a stopped server or another gRPC: not measurable
            return None
        return max(0, started - done - self._errors.taken.active)

    async def start(self) -> int:
        """Binds and starts; raises ListenError when the address cannot be bound."""
        address = f"{self.host}:{self._requested_port}"
        try:
            if self._credentials is None:
                self._port = self.server.add_insecure_port(address)
            else:
                self._port = self.server.add_secure_port(address, self._credentials)
        except RuntimeError as exc:  # grpcio raises it for "Failed to bind to address"
            raise ListenError(_bind_error(self._name, address)) from exc
        if self._port == 0:
            raise ListenError(_bind_error(self._name, address))
        await self.server.start()
        return self._port

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
        """Stops accepting and drains in-flight calls for up to ``grace`` seconds."""
        await self.server.stop(grace)


def _newest_channelz_server() -> int | None:
    """The channelz id of the server created last in this process (None: channelz off or
    not readable), read right after creating one to learn its id."""
    newest: int | None = None
    try:
        while True:
            page = json.loads(cygrpc.channelz_get_servers((newest or -1) + 1))
            ids = [int(server["ref"]["serverId"]) for server in page.get("server", ())]
            if not ids:
                return newest
            newest = max(ids)
            if page.get("end", True):
                return newest
    except Exception:  # noqa: BLE001 - channelz is an optional view, never a reason to fail
        return None


def _bind_error(name: str, address: str) -> str:
    return (
        f"{name}: cannot listen on {address}: the port is in use or the address is not "
        "this machine's"
    )


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (a second signal is left to the default handler)."""
    loop = asyncio.get_running_loop()

    def handler(signum: int) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()
        loop.remove_signal_handler(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler, sig)
