"""Scoped bearer tokens on every RPC but health and reflection, over real gRPC."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.common.auth import (
    TokenStore,
    bearer,
    client_interceptors,
    hash_token,
    new_token,
    parse_tokens,
    required_scope,
    tokens_file_text,
)
from sluice.common.errors import ConfigError
from sluice.common.metrics import Metrics
from sluice.common.settings import CommonSettings
from sluice.common.telemetry import disabled
from sluice.ingest import app as ingest_app
from sluice.ingest.settings import IngestSettings
from sluice.sender import app as sender_app
from sluice.sender.providers.sandbox import SandboxLedger
from sluice.sender.settings import SenderSettings
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, sender_pb2, sender_pb2_grpc
from tests.conftest import REDIS_URL

SCOPES = {
    "client": ("submit", "read"),
    "reader": ("read",),
    "operator": ("admin",),
    "router": ("send",),
}


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[dict[str, str], Path]:
    values = {name: new_token() for name in SCOPES}
    path = tmp_path / "tokens.toml"
    path.write_text(tokens_file_text(SCOPES, values), encoding="utf-8")
    return values, path


def test_scopes_follow_the_method_names() -> None:
    assert required_scope("/grpc.health.v1.Health/Check") is None
    assert required_scope("/grpc.reflection.v1alpha.ServerReflection/X") is None
    assert required_scope("/sluice.v1.IngestService/SubmitIntent") == "submit"
    assert required_scope("/sluice.v1.IngestService/GetIntent") == "read"
    assert required_scope("/sluice.v1.RouterService/PauseProvider") == "admin"
    assert required_scope("/sluice.v1.SenderService/SendBatch") == "send"
    assert required_scope("/sluice.v1.SenderService/GetCapacity") == "read"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[[tokens]]\nname = "a"\nsha256 = "00"\nscopes = ["read"]\n', "64 hex"),
        (f'[[tokens]]\nname = "a"\nsha256 = "{"0" * 64}"\nscopes = ["raed"]\n', "scopes"),
        (
            f'[[tokens]]\nname = "a"\nsha256 = "{"0" * 64}"\nscopes = ["read"]\nscope = 1\n',
            "unknown",
        ),
    ],
)
def test_a_bad_tokens_file_stops_start_up(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        TokenStore(path)


def test_the_file_holds_hashes_never_tokens(tokens: tuple[dict[str, str], Path]) -> None:
    values, path = tokens
    text = path.read_text()
    for token in values.values():
        assert token not in text
        assert hash_token(token) in text


def test_require_auth_without_a_tokens_file_stops_start_up() -> None:
    with pytest.raises(ConfigError, match="SLUICE_AUTH_TOKENS_FILE"):
        CommonSettings.from_env({"SLUICE_REQUIRE_AUTH": "true"})


@pytest.fixture
async def ingest(
    pg_dsn: str, tokens: tuple[dict[str, str], Path]
) -> AsyncIterator[tuple[str, Metrics]]:
    _, path = tokens
    metrics = Metrics("ingest")
    settings = IngestSettings(database_url=pg_dsn, db_pool_size=2, auth_tokens_file=str(path))
    async with ingest_app.running(settings, disabled(), port=0, metrics=metrics) as service:
        yield f"127.0.0.1:{service.port}", metrics


def _get(target: str, metadata: tuple[tuple[str, str], ...] = ()) -> object:
    async def call() -> object:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            return await stub.GetIntent(
                ingest_pb2.GetIntentRequest(id="00000000-0000-0000-0000-000000000000"),
                metadata=metadata,
            )

    return call()


async def _code(awaitable: object) -> grpc.StatusCode:
    try:
        await awaitable  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_ingest_refuses_missing_unknown_and_unscoped_tokens(
    ingest: tuple[str, Metrics], tokens: tuple[dict[str, str], Path]
) -> None:
    target, metrics = ingest
    values, _ = tokens
    assert await _code(_get(target)) == grpc.StatusCode.UNAUTHENTICATED
    assert await _code(_get(target, bearer("slc_not-a-token"))) == grpc.StatusCode.UNAUTHENTICATED
    # A router's send token cannot read intents.
    assert await _code(_get(target, bearer(values["router"]))) == grpc.StatusCode.PERMISSION_DENIED
    # With the right scope the call reaches the servicer (and finds nothing).
    assert await _code(_get(target, bearer(values["reader"]))) == grpc.StatusCode.NOT_FOUND
    assert await _code(_get(target, bearer(values["operator"]))) == grpc.StatusCode.NOT_FOUND
    # Health stays open.
    async with grpc.aio.insecure_channel(target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    exposition = metrics.exposition().decode()
    for reason in ("missing", "unknown", "scope"):
        assert f'sluice_auth_refusals_total{{reason="{reason}",service="ingest"}} 1.0' in exposition
    # The refusal is a rich status like any other error.
    try:
        await _get(target)  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        details = dict(exc.trailing_metadata() or ())["grpc-status-details-bin"]
        info = error_details_pb2.ErrorInfo()
        assert status_pb2.Status.FromString(details).details[0].Unpack(info)
        assert info.reason == "UNAUTHENTICATED"


async def test_tokens_rotate_without_a_restart(
    ingest: tuple[str, Metrics], tokens: tuple[dict[str, str], Path]
) -> None:
    target, _ = ingest
    values, path = tokens
    fresh = new_token()
    # The new token is added beside the old ones; the old reader token is removed.
    scopes = {**SCOPES, "reader-2": ("read",)}
    del scopes["reader"]
    path.write_text(tokens_file_text(scopes, {**values, "reader-2": fresh}), encoding="utf-8")
    os.utime(path, ns=(1, 10**18))  # a different mtime even on coarse file systems
    deadline = asyncio.get_running_loop().time() + 15
    while await _code(_get(target, bearer(fresh))) != grpc.StatusCode.NOT_FOUND:
        assert asyncio.get_running_loop().time() < deadline, "the new token never worked"
        await asyncio.sleep(0.5)
    assert await _code(_get(target, bearer(values["reader"]))) == grpc.StatusCode.UNAUTHENTICATED
    assert await _code(_get(target, bearer(values["client"]))) == grpc.StatusCode.NOT_FOUND


async def test_send_batch_without_the_send_scope_sends_nothing(
    tmp_path: Path,
    tokens: tuple[dict[str, str], Path],
    redis_prefix: str,
    redis_client: aioredis.Redis,
) -> None:
    values, path = tokens
    providers = tmp_path / "providers.toml"
    providers.write_text(
        '[[providers]]\nname = "p"\nkind = "sandbox"\ncost_per_thousand = 0.1\n'
        'intents = ["marketing"]\n'
    )
    settings = SenderSettings(
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        providers_file=str(providers),
        auth_tokens_file=str(path),
    )
    request = sender_pb2.SendBatchRequest(
        provider="p",
        template=sender_pb2.TemplateContent(
            id="t", subject="Hi", text_body="Hi", from_address="noreply@example.com"
        ),
        messages=[
            sender_pb2.OutboundMessage(intent_id=f"i{n}", recipient=f"u{n}@example.com")
            for n in range(3)
        ],
    )
    async with sender_app.running(settings, disabled(), port=0) as service:
        target = f"127.0.0.1:{service.port}"
        for token in ("", "slc_forged", values["operator"], values["client"]):
            async with grpc.aio.insecure_channel(
                target, interceptors=client_interceptors(token)
            ) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await sender_pb2_grpc.SenderServiceStub(channel).SendBatch(request)
            assert caught.value.code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            )
        ledger = SandboxLedger(redis_client, redis_prefix)
        assert await ledger.sent_count("p") == 0
        async with grpc.aio.insecure_channel(
            target, interceptors=client_interceptors(values["router"])
        ) as channel:
            answer = await sender_pb2_grpc.SenderServiceStub(channel).SendBatch(request)
        assert [r.outcome for r in answer.results] == [sender_pb2.SEND_OUTCOME_ACCEPTED] * 3
        assert await ledger.sent_count("p") == 3


def test_parse_tokens_refuses_the_same_token_twice() -> None:
    digest = "a" * 64
    doc = {"tokens": [{"name": "a", "sha256": digest, "scopes": ["read"]}] * 2}
    with pytest.raises(ConfigError, match="twice"):
        parse_tokens(doc, "t")
