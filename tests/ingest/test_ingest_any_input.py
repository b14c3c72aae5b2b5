"""No input yields INTERNAL or UNKNOWN: hypothesis over every string field of every submit
RPC (reply-to, header and tag maps included) and the list filter, over real gRPC against
real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.v1 import ingest_pb2, intent_pb2
from tests.ingest.ingest_stack import Ingest, running_ingest

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
ANSWERS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}

# Short text of any code point (NUL, CR/LF, bidi controls, astral planes), values that
# look right, and long runs that test every size bound. No lone surrogates: a proto string
# must be UTF-8, so no client can send one (protobuf refuses to build the message).
hostile = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "welcome", "alice@example.com", "a\x00b", "x\r\ny", "\u202e"]),
    st.builds(
        lambda c, n: c * n,
        st.characters(exclude_categories=["Cs"]),
        st.integers(min_value=100, max_value=30_000),
    ),
)
variables = st.dictionaries(hostile, hostile, max_size=4) | st.just({"name": "A", "footer": "B"})
# Extras: hostile text, plus names and values that pass, so the valid path is reached too.
header_names = hostile | st.sampled_from(["X-Campaign", "x-campaign", "List-Id", "Bcc", "X-A\n"])
header_values = hostile | st.sampled_from(["spring", "=?utf-8?q?=0D=0A?=", "a\tb"])
tag_text = hostile | st.sampled_from(["cohort", "b-2", "sluice_intent_id", "a b"])
reply_tos = hostile | st.sampled_from(
    ["help@example.com", "Help <h@example.com>", "jörg@bücher.de"]
)


@st.composite
def submissions(draw: st.DrawFn) -> intent_pb2.IntentSubmission:
    sub = intent_pb2.IntentSubmission(
        idempotency_key=draw(hostile),
        campaign_id=draw(hostile),
        recipient=draw(hostile),
        intent=draw(st.integers(min_value=0, max_value=4)),  # type: ignore[arg-type]
        template_id=draw(st.sampled_from(["welcome"]) | hostile),
        variables=draw(variables),
        run=draw(hostile),
        reply_to=draw(reply_tos),
        headers=draw(st.dictionaries(header_names, header_values, max_size=3)),
        tags=draw(st.dictionaries(tag_text, tag_text, max_size=3)),
    )
    if draw(st.booleans()):
        sub.send_at.seconds = draw(st.integers(min_value=-(2**40), max_value=2**40))
        sub.send_at.nanos = draw(st.integers(min_value=-(2**31), max_value=2**31 - 1))
    return sub


@st.composite
def valid_but_extras(draw: st.DrawFn) -> intent_pb2.IntentSubmission:
    """A submission valid in every field but its extras, so hostile extras reach the
    database whenever validation lets them through (fully random submissions rarely get
    past the other fields)."""
    return intent_pb2.IntentSubmission(
        idempotency_key=draw(st.uuids()).hex,
        recipient="alice@example.com",
        intent=intent_pb2.INTENT_MARKETING,
        template_id="welcome",
        variables={"name": "A", "footer": "B"},
        reply_to=draw(reply_tos),
        headers=draw(st.dictionaries(header_names, header_values, max_size=3)),
        tags=draw(st.dictionaries(tag_text, tag_text, max_size=3)),
    )


SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
async def ingest(pg_dsn: str, pg_pool: asyncpg.Pool) -> AsyncIterator[Ingest]:
    async with running_ingest(pg_dsn, pg_pool) as running:
        yield running


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@SETTINGS
@given(sub=submissions())
async def test_submit_intent_never_internal(
    ingest: Ingest, sub: intent_pb2.IntentSubmission
) -> None:
    code = await code_of(ingest.stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=sub)))
    assert code in ANSWERS, code


@SETTINGS
@given(subs=st.lists(submissions(), min_size=1, max_size=5))
async def test_submit_intents_never_internal(
    ingest: Ingest, subs: list[intent_pb2.IntentSubmission]
) -> None:
    reply = await ingest.stub.SubmitIntents(ingest_pb2.SubmitIntentsRequest(intents=subs))
    assert len(reply.results) == len(subs)
    for result in reply.results:
        assert result.outcome != ingest_pb2.SUBMIT_OUTCOME_UNSPECIFIED
        assert result.error.code not in (13, 2)  # INTERNAL, UNKNOWN


@SETTINGS
@given(
    subs=st.lists(valid_but_extras(), min_size=1, max_size=5, unique_by=lambda s: s.idempotency_key)
)
async def test_hostile_extras_never_fail_a_batch(
    ingest: Ingest, subs: list[intent_pb2.IntentSubmission]
) -> None:
    # Examples share the database, so a key may come again (duplicate, or reused).
    reply = await ingest.stub.SubmitIntents(ingest_pb2.SubmitIntentsRequest(intents=subs))
    assert len(reply.results) == len(subs)
    for result in reply.results:
        assert result.outcome != ingest_pb2.SUBMIT_OUTCOME_UNSPECIFIED
        assert result.error.code in (0, 3, 6), result  # OK, INVALID_ARGUMENT, ALREADY_EXISTS


@SETTINGS
@given(chunks=st.lists(st.lists(submissions(), min_size=1, max_size=3), min_size=1, max_size=3))
async def test_submit_intent_stream_never_internal(
    ingest: Ingest, chunks: list[list[intent_pb2.IntentSubmission]]
) -> None:
    requests = [
        ingest_pb2.SubmitIntentStreamRequest(intents=c, chunk=i) for i, c in enumerate(chunks)
    ]
    replies = [r async for r in ingest.stub.SubmitIntentStream(iter(requests))]
    assert [r.chunk for r in replies] == list(range(len(chunks)))
    for reply, chunk in zip(replies, chunks, strict=True):
        assert reply.created + reply.duplicates + reply.rejected == len(chunk)
        assert all(r.error.code not in (13, 2) for r in reply.results)


@SETTINGS
@given(campaign=hostile, token=hostile, intent_id=hostile)
async def test_list_and_get_never_internal(
    ingest: Ingest, campaign: str, token: str, intent_id: str
) -> None:
    listed = await code_of(
        ingest.stub.ListIntents(
            ingest_pb2.ListIntentsRequest(campaign_id=campaign, page_token=token)
        )
    )
    got = await code_of(ingest.stub.GetIntent(ingest_pb2.GetIntentRequest(id=intent_id)))
    assert listed in ANSWERS, listed
    assert got in ANSWERS | {grpc.StatusCode.NOT_FOUND}, got
