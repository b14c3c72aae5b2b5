"""Fixtures shared by the router tests: the template intents use, and a fake sender
served over real gRPC on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from tests.conftest import InsertTemplate
from tests.router.router_fakes import FakeSender, serve_fake


@pytest.fixture
async def template(insert_template: InsertTemplate) -> str:
    return await insert_template("welcome")


@pytest.fixture
def fake() -> FakeSender:
    return FakeSender()


@pytest.fixture
async def sender_channel(fake: FakeSender) -> AsyncIterator[grpc.aio.Channel]:
    async for port in serve_fake(fake):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
