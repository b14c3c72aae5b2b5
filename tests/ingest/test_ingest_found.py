"""What a new user found when trying ingest, each over real gRPC and real PostgreSQL.

Each test failed before its fix: NUL bytes answered INTERNAL (PostgreSQL refuses them) and
one such item failed a whole batch; far-future and out-of-range timestamps answered
INTERNAL or UNKNOWN; page tokens with overflowing dates INTERNAL; long inputs quoted in
errors overflowed the client's 16 KiB metadata limit; CR/LF passed in campaign ids and in
variables the subject uses; a 65-character local part was accepted; malformed bytes
answered UNKNOWN.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2

from sluice.v1 import ingest_pb2
from tests.grpc_helpers import error_info, field_violations, status_details
from tests.ingest.ingest_stack import Ingest, count_intents, running_ingest, submission


@pytest.fixture
async def ingest(pg_dsn: str, pg_pool: asyncpg.Pool) -> AsyncIterator[Ingest]:
    async with running_ingest(pg_dsn, pg_pool) as running:
        yield running


async def rejected(ingest: Ingest, **overrides: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ingest.stub.SubmitIntent(
            ingest_pb2.SubmitIntentRequest(intent=submission(**overrides))  # type: ignore[arg-type]
        )
    return info.value


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"campaign_id": "spr\x00ing"}, "intent.campaign_id"),
        ({"template_id": "wel\x00come"}, "intent.template_id"),
        ({"key": "k\x00"}, "intent.idempotency_key"),
        ({"run": "w\x0049"}, "intent.run"),
        ({"recipient": "al\x00ice@example.com"}, "intent.recipient"),
        ({"variables": {"name": "Al\x00ice", "footer": "x"}}, "intent.variables['name']"),
        ({"variables": {"name": "Alice", "footer": "B\x00ye"}}, "intent.variables['footer']"),
    ],
)
async def test_nul_in_any_string_is_invalid_argument_naming_the_field(
    ingest: Ingest, pg_pool: asyncpg.Pool, overrides: dict[str, object], field: str
) -> None:
    exc = await rejected(ingest, **overrides)
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    assert field in field_violations(exc)
    assert await count_intents(pg_pool) == 0


async def test_one_bad_item_never_fails_the_good_ones(
    ingest: Ingest, pg_pool: asyncpg.Pool
) -> None:
    items = [
        submission("good-1"),
        submission("bad", campaign_id="x\x00y"),
        submission("good-2", template_id="a\x00b"),
        submission("good-3", recipient="bob@example.com"),
    ]
    reply = await ingest.stub.SubmitIntents(ingest_pb2.SubmitIntentsRequest(intents=items))
    outcomes = [r.outcome for r in reply.results]
    assert outcomes == [
        ingest_pb2.SUBMIT_OUTCOME_CREATED,
        ingest_pb2.SUBMIT_OUTCOME_REJECTED,
        ingest_pb2.SUBMIT_OUTCOME_REJECTED,
        ingest_pb2.SUBMIT_OUTCOME_CREATED,
    ]
    assert reply.results[1].error.reason == "CONTROL_CHARACTERS"
    assert reply.results[1].error.field_violations[0].field == "intents[1].campaign_id"
    assert await count_intents(pg_pool) == 2


def ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("send_at", ts(253_402_214_400), "TIME_OUT_OF_RANGE"),  # 9999-12-31
        ("send_at", ts(253_402_300_800), "TIME_OUT_OF_RANGE"),  # year 10000
        ("send_at", ts(-62_135_596_801), "TIME_OUT_OF_RANGE"),  # before year 1
        ("send_at", ts(1_900_000_000, -1), "TIME_OUT_OF_RANGE"),
        ("deadline", ts(1_900_000_000, 2_000_000_000), "TIME_OUT_OF_RANGE"),
        ("deadline", ts(-62_135_596_800), "TIME_OUT_OF_RANGE"),  # year 1: in the past
    ],
)
async def test_timestamps_out_of_range_are_invalid_argument(
    ingest: Ingest, field: str, value: timestamp_pb2.Timestamp, reason: str
) -> None:
    exc = await rejected(ingest, **{field: value})
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    assert f"intent.{field}" in field_violations(exc)
    assert error_info(exc).reason == reason


def token(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "page_token",
    [
        token({"t": "9999-12-31T23:59:59-23:59", "i": str(uuid.uuid4()), "f": "x"}),
        token({"t": "0001-01-01T00:00:00+23:59", "i": str(uuid.uuid4()), "f": "x"}),
        token({"t": "2026-01-01T00:00:00", "i": str(uuid.uuid4()), "f": "x"}),
        token({"t": 5, "i": 5, "f": 5}),
        token([1, 2]),
        token("[" * 300),
        "!!!not-base64",
        "A" * 5000,
    ],
)
async def test_page_tokens_that_overflow_or_are_not_ours(ingest: Ingest, page_token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ingest.stub.ListIntents(ingest_pb2.ListIntentsRequest(page_token=page_token))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(info.value).reason == "PAGE_TOKEN_INVALID"


async def test_list_filter_with_nul_is_invalid_argument(ingest: Ingest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ingest.stub.ListIntents(ingest_pb2.ListIntentsRequest(campaign_id="a\x00b"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "campaign_id" in field_violations(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"template_id": "t" * 10_000},
        {"variables": {"n" * 20_000: "x", "name": "A", "footer": "B"}},
        {"variables": {f"v{i}_" + "n" * 900: "x" for i in range(60)}},
        {"recipient": "a" * 100_000 + "@example.com"},
        {"key": "k" * 100_000, "campaign_id": "c" * 100_000, "run": "r" * 100_000},
    ],
)
async def test_errors_quote_bounded_input_so_the_trailer_stays_small(
    ingest: Ingest, overrides: dict[str, object]
) -> None:
    exc = await rejected(ingest, **overrides)
    # Not RESOURCE_EXHAUSTED "received metadata size exceeds hard limit": the field named.
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    assert field_violations(exc)
    trailer = sum(len(k) + len(v) for k, v in exc.trailing_metadata() or ())
    assert trailer < 4096
    assert len(status_details(exc).SerializeToString()) < 4096


@pytest.mark.parametrize("campaign", ["spring\r\nBcc: x@example.com", "a\nb", "a\u202eb"])
async def test_campaign_id_with_cr_lf_or_bidi_is_refused(ingest: Ingest, campaign: str) -> None:
    exc = await rejected(ingest, campaign_id=campaign)
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(exc).keys() == {"intent.campaign_id"}
    assert error_info(exc).reason == "CONTROL_CHARACTERS"


async def test_local_part_of_65_characters_is_refused(ingest: Ingest) -> None:
    exc = await rejected(ingest, recipient="a" * 65 + "@example.com")
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(exc).reason == "RECIPIENT_INVALID"
    ok = await ingest.stub.SubmitIntent(
        ingest_pb2.SubmitIntentRequest(intent=submission(recipient="a" * 64 + "@example.com"))
    )
    assert ok.created


async def test_variable_the_subject_uses_must_be_one_line(
    ingest: Ingest, pg_pool: asyncpg.Pool
) -> None:
    exc = await rejected(ingest, variables={"name": "Al\r\nBcc: x@example.com", "footer": "x"})
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "intent.variables['name']" in field_violations(exc)
    # The body-only variable may hold line breaks: they are the body's business.
    ok = await ingest.stub.SubmitIntent(
        ingest_pb2.SubmitIntentRequest(
            intent=submission(variables={"name": "Al", "footer": "line 1\r\nline 2"})
        )
    )
    assert ok.created
    assert await count_intents(pg_pool) == 1


@pytest.mark.parametrize("method", ["SubmitIntent", "SubmitIntents", "GetIntent", "ListIntents"])
async def test_bytes_that_do_not_parse_are_invalid_argument(ingest: Ingest, method: str) -> None:
    call = ingest.channel.unary_unary(f"/sluice.v1.IngestService/{method}")
    for raw in (b"\x0a\x02\xff\xfe", b"\x0a\x05\x0a\x03\xff\xfe\xfd", b"\xff\xff\xff"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(raw)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "request" in field_violations(info.value)


async def test_oversized_request_is_resource_exhausted_and_the_server_lives_on(
    pg_dsn: str, pg_pool: asyncpg.Pool
) -> None:
    async with running_ingest(pg_dsn, pg_pool, ingest_max_request_bytes=64 * 1024) as ingest:
        big = [
            submission(f"b{i}", variables={"name": "x" * 1000, "footer": ""}) for i in range(100)
        ]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ingest.stub.SubmitIntents(ingest_pb2.SubmitIntentsRequest(intents=big))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = await ingest.stub.SubmitIntents(ingest_pb2.SubmitIntentsRequest(intents=big[:10]))
        assert all(r.outcome == ingest_pb2.SUBMIT_OUTCOME_CREATED for r in ok.results)
