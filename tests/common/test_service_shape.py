"""The one service shape: supervision, start-up failures, error mapping for every RPC
shape, undecodable requests, and the metrics listener."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.cli.__main__ import main
from sluice.cli.embedded import find_free_port
from sluice.common.errors import InvalidArgument, NotFound, ResourceExhausted
from sluice.common.grpcserver import GrpcListener
from sluice.common.metrics import Metrics
from sluice.common.service import ListenError, Service, ServiceFailed
from sluice.common.telemetry import disabled
from sluice.ingest import app as ingest_app
from sluice.ingest.settings import IngestSettings
from sluice.router import app as router_app
from sluice.router.settings import RouterSettings
from tests.conftest import clean_env

# ---- supervision ----------------------------------------------------------------------------


async def test_a_dead_router_worker_turns_health_not_serving_and_fails_the_service(
    pg_dsn: str,
) -> None:
    settings = RouterSettings(
        database_url=pg_dsn,
        sender_target=f"127.0.0.1:{find_free_port()}",
        router_concurrency=2,
        shutdown_grace_seconds=1.0,
        db_pool_size=3,
    )
    async with router_app.running(settings, disabled(), port=0) as service:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
            workers = [t for t in asyncio.all_tasks() if t.get_name() == "sluice-router-worker-0"]
            assert len(workers) == 1
            workers[0].cancel()  # a worker dying (here: cancelled from outside) is a failure
            await asyncio.wait_for(service.failed.wait(), 5)
            for _ in range(50):
                status = (await health.Check(check)).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(ServiceFailed, match="sluice-router-worker-0"):
            await service.wait(asyncio.Event())


async def test_a_task_that_ends_during_stop_is_not_a_failure() -> None:
    service = Service("t", grace=0.5)
    service.add_listener(GrpcListener("127.0.0.1", 0, service_names=[]))
    async with service.running():
        service.spawn(asyncio.sleep(3600), name="forever")
    assert not service.failed.is_set()


# ---- start-up failures ----------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``main()`` configures the root logger for this process: undo it afterwards, so later
    tests do not log into the stream this test's capture closed."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_a_port_in_use_is_one_line_and_exit_code_4(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for key, value in clean_env(
            DATABASE_URL=pg_dsn, SLUICE_INGEST_PORT=str(port), SLUICE_METRICS_PORT="-1"
        ).items():
            monkeypatch.setenv(key, value)
        code = main(["serve", "ingest"])
    err = capsys.readouterr().err
    assert code == 4
    assert f"127.0.0.1:{port}" in err
    assert "Traceback" not in err


async def test_a_metrics_port_in_use_fails_start_up_and_leaves_nothing_listening(
    pg_dsn: str,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        grpc_port = find_free_port()
        settings = IngestSettings(database_url=pg_dsn, metrics_port=busy, db_pool_size=2)
        with pytest.raises(ListenError, match="already in use"):
            async with ingest_app.running(settings, disabled(), port=grpc_port):
                pytest.fail("started although its metrics port is taken")
    # The gRPC listener that had started was stopped again.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", grpc_port))


# ---- error mapping for all four RPC shapes ----------------------------------------------------

SERVICE = "test.Shapes"


def _raise(kind: str) -> None:
    if kind == "invalid":
        raise InvalidArgument("bad " + "x" * 20_000, [("f" * 20_000, "d" * 20_000)] * 500)
    if kind == "exhausted":
        raise ResourceExhausted("slow down", retry_after=1.5)
    if kind == "missing":
        raise NotFound("no such thing")
    raise RuntimeError("a bug")


def _shapes_handler() -> grpc.GenericRpcHandler:
    async def uu(request: bytes, context: Any) -> bytes:
        _raise(request.decode())
        return b""

    async def us(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        _raise(request.decode())

    async def su(requests: AsyncIterator[bytes], context: Any) -> bytes:
        async for request in requests:
            _raise(request.decode())
        return b""

    async def ss(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield b"echo"
            _raise(request.decode())

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "UU": grpc.unary_unary_rpc_method_handler(uu),
            "US": grpc.unary_stream_rpc_method_handler(us),
            "SU": grpc.stream_unary_rpc_method_handler(su),
            "SS": grpc.stream_stream_rpc_method_handler(ss),
        },
    )


@pytest.fixture
async def shapes() -> AsyncIterator[tuple[grpc.aio.Channel, Metrics]]:
    metrics = Metrics("test")
    listener = GrpcListener("127.0.0.1", 0, service_names=[SERVICE], metrics=metrics)
    listener.server.add_generic_rpc_handlers((_shapes_handler(),))
    port = await listener.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, metrics
    finally:
        await listener.stop(0)


async def _call(channel: grpc.aio.Channel, shape: str, kind: str) -> grpc.aio.AioRpcError:
    method = f"/{SERVICE}/{shape}"
    payload = kind.encode()

    async def one() -> AsyncIterator[bytes]:
        yield payload

    async def invoke() -> None:
        if shape == "UU":
            await channel.unary_unary(method)(payload)
        elif shape == "US":
            async for _ in channel.unary_stream(method)(payload):
                pass
        elif shape == "SU":
            await channel.stream_unary(method)(one())
        else:
            async for _ in channel.stream_stream(method)(one()):
                pass

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await invoke()
    return caught.value


def _details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no status details")


@pytest.mark.parametrize("shape", ["UU", "US", "SU", "SS"])
async def test_every_rpc_shape_maps_errors_to_precise_statuses(
    shapes: tuple[grpc.aio.Channel, Metrics], shape: str
) -> None:
    channel, metrics = shapes
    invalid = await _call(channel, shape, "invalid")
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = _details(invalid)
    # Unbounded input is never echoed whole: the trailer stays far below 16 KiB.
    assert len(status.SerializeToString()) < 5_000
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR))
    assert 0 < len(bad.field_violations) <= 10

    exhausted = await _call(channel, shape, "exhausted")
    assert exhausted.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in _details(exhausted).details if d.Is(retry.DESCRIPTOR))
    assert retry.retry_delay.seconds == 1

    assert (await _call(channel, shape, "missing")).code() == grpc.StatusCode.NOT_FOUND
    bug = await _call(channel, shape, "bug")
    assert bug.code() == grpc.StatusCode.INTERNAL
    assert "a bug" not in (bug.details() or "")  # nothing of an internal error leaks
    exposition = metrics.exposition().decode()
    assert f'method="/{SERVICE}/{shape}"' in exposition
    assert 'code="INVALID_ARGUMENT"' in exposition


# ---- undecodable requests -------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff",  # not protobuf at all
        b"\x0a\x02\xff\xfe",  # field 1 (intent_id, a string) holding invalid UTF-8
    ],
)
async def test_undecodable_requests_are_invalid_argument_not_unknown(
    pg_dsn: str, payload: bytes
) -> None:
    settings = IngestSettings(database_url=pg_dsn, db_pool_size=2)
    async with (
        ingest_app.running(settings, disabled(), port=0) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        call = channel.unary_unary("/sluice.v1.IngestService/GetIntent")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(payload)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- metrics listener -----------------------------------------------------------------------


async def test_each_service_serves_metrics_and_health_over_http(
    pg_dsn: str, tmp_path: Path
) -> None:
    settings = IngestSettings(database_url=pg_dsn, db_pool_size=2)
    async with ingest_app.running(settings, disabled(), port=0) as service:
        metrics_port = service.listener("metrics").port
        assert metrics_port not in (0, 9091)  # port=0: any free port, never the default
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary("/sluice.v1.IngestService/GetIntent")(b"\xff")
        base = f"http://127.0.0.1:{metrics_port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/metrics") as response:
                body = await response.text()
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 200
            await service.set_serving(False)
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 503
    assert "sluice_rpc_requests_total" in body
    assert 'code="INVALID_ARGUMENT"' in body
    assert "sluice_queue_deadline_budget_seconds" in body
