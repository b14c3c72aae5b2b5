"""A SenderServicer built by a test, served the way the sender serves it (real gRPC, port 0)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sluice.common.app import new_service
from sluice.common.metrics import Metrics
from sluice.common.telemetry import disabled
from sluice.sender.app import SERVICE_NAME
from sluice.sender.service import SenderServicer
from sluice.sender.settings import SenderSettings
from sluice.v1 import sender_pb2_grpc


@contextlib.asynccontextmanager
async def serving(servicer: SenderServicer) -> AsyncIterator[int]:
    """Serves ``servicer`` on a free loopback port; yields the port."""
    service, listener = new_service(
        "sender",
        SenderSettings(metrics_port=-1),
        disabled(),
        Metrics("sender", enabled=False),
        grpc_port=0,
        service_names=[SERVICE_NAME],
    )
    sender_pb2_grpc.add_SenderServiceServicer_to_server(servicer, listener.server)
    async with service.running():
        yield service.port
