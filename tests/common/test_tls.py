"""TLS on the gRPC listeners and mutual TLS between router and sender, with certificates the
test makes itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import grpc
import pytest

from sluice.common.errors import ConfigError
from sluice.common.telemetry import disabled
from sluice.common.tls import channel_credentials
from sluice.router import app as router_app
from sluice.router.settings import RouterSettings
from sluice.sender import app as sender_app
from sluice.sender.settings import SenderSettings
from sluice.v1 import sender_pb2, sender_pb2_grpc
from tests.certs import ThrowawayCA
from tests.conftest import REDIS_URL, InsertTemplate
from tests.router.router_fakes import rows, seed

PROVIDERS = """
[[providers]]
name = "p"
kind = "sandbox"
cost_per_thousand = 0.1
intents = ["marketing"]
"""


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = ThrowawayCA(tmp_path / "pki")
    sender = ca.issue("sender", server=True)
    router = ca.issue("router", server=False)
    other = ThrowawayCA(tmp_path / "other", name="someone-else").issue("intruder", server=False)
    return {
        "ca": ca.cert,
        "sender_cert": sender.cert,
        "sender_key": sender.key,
        "router_cert": router.cert,
        "router_key": router.key,
        "intruder_cert": other.cert,
        "intruder_key": other.key,
    }


@pytest.fixture
def sender_settings(tmp_path: Path, pki: dict[str, Path], redis_prefix: str) -> SenderSettings:
    providers = tmp_path / "providers.toml"
    providers.write_text(PROVIDERS)
    return SenderSettings(
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        providers_file=str(providers),
        tls_cert_file=str(pki["sender_cert"]),
        tls_key_file=str(pki["sender_key"]),
        tls_client_ca_file=str(pki["ca"]),
    )


async def _capacity(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    if credentials is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, credentials)
    async with channel:
        try:
            await sender_pb2_grpc.SenderServiceStub(channel).GetCapacity(
                sender_pb2.GetCapacityRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_the_sender_takes_only_clients_with_a_certificate_from_its_ca(
    sender_settings: SenderSettings, pki: dict[str, Path]
) -> None:
    async with sender_app.running(sender_settings, disabled(), port=0) as service:
        target = f"localhost:{service.port}"
        ca = str(pki["ca"])
        router = channel_credentials(ca, str(pki["router_cert"]), str(pki["router_key"]))
        assert await _capacity(target, router) == grpc.StatusCode.OK
        # No client certificate, one from another CA, or plaintext: no connection at all.
        assert await _capacity(target, channel_credentials(ca)) == grpc.StatusCode.UNAVAILABLE
        intruder = channel_credentials(ca, str(pki["intruder_cert"]), str(pki["intruder_key"]))
        assert await _capacity(target, intruder) == grpc.StatusCode.UNAVAILABLE
        assert await _capacity(target, None) == grpc.StatusCode.UNAVAILABLE


async def test_a_router_sends_through_a_mutual_tls_sender(
    sender_settings: SenderSettings,
    pki: dict[str, Path],
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    insert_template: InsertTemplate,
    tmp_path: Path,
) -> None:
    await insert_template("welcome")
    ids = await seed(pg_pool, [f"user{i}@example.com" for i in range(20)])
    async with sender_app.running(sender_settings, disabled(), port=0) as sender:
        router_settings = RouterSettings(
            database_url=pg_dsn,
            providers_file=sender_settings.providers_file,
            sender_target=f"localhost:{sender.port}",
            sender_tls_ca_file=str(pki["ca"]),
            sender_tls_cert_file=str(pki["router_cert"]),
            sender_tls_key_file=str(pki["router_key"]),
            router_concurrency=1,
            router_idle_sleep=0.05,
            shutdown_grace_seconds=1.0,
            db_pool_size=3,
        )
        async with router_app.running(router_settings, disabled(), port=0):
            for _ in range(200):
                statuses = {r["status"] for r in (await rows(pg_pool, ids)).values()}
                if statuses == {"sent"}:
                    break
                await asyncio.sleep(0.1)
    assert statuses == {"sent"}


def test_half_configured_tls_stops_start_up(pki: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="go together"):
        channel_credentials(str(pki["ca"]), str(pki["router_cert"]))
    with pytest.raises(ConfigError, match="CA_FILE"):
        channel_credentials("", str(pki["router_cert"]), str(pki["router_key"]))
