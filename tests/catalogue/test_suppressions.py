"""SuppressionService, the submit hook and the lease query, against real PostgreSQL."""

from __future__ import annotations

import uuid

import asyncpg
import grpc
import pytest

from sluice.ingest.repository import insert_intents
from sluice.router import repository as router_repo
from sluice.v1 import ingest_pb2, intent_pb2, suppression_pb2
from tests.catalogue.catalogue_fixtures import Stubs, submission, welcome
from tests.db.db_factories import new_intent
from tests.grpc_helpers import field_violations

MANUAL = suppression_pb2.SUPPRESSION_REASON_MANUAL


async def add(
    stubs: Stubs, address: str, reason: int = MANUAL
) -> suppression_pb2.AddSuppressionResponse:
    return await stubs.suppressions.AddSuppression(
        suppression_pb2.AddSuppressionRequest(address=address, reason=reason, note="test")  # type: ignore[arg-type]
    )


async def test_add_check_list_remove(stubs: Stubs) -> None:
    added = await add(stubs, "Bob@EXAMPLE.com", suppression_pb2.SUPPRESSION_REASON_HARD_BOUNCE)
    assert added.created
    # stored as ingest stores recipients: the domain lower-cased, the local part kept
    assert added.suppression.address == "Bob@example.com"
    assert added.suppression.reason == suppression_pb2.SUPPRESSION_REASON_HARD_BOUNCE
    again = await add(stubs, "Bob@example.com", suppression_pb2.SUPPRESSION_REASON_COMPLAINT)
    assert not again.created
    assert again.suppression.reason == suppression_pb2.SUPPRESSION_REASON_HARD_BOUNCE
    await add(stubs, "carol@example.com", suppression_pb2.SUPPRESSION_REASON_UNSUBSCRIBE)
    await add(stubs, "dan@example.com", suppression_pb2.SUPPRESSION_REASON_COMPLAINT)

    check = await stubs.suppressions.CheckSuppression(
        suppression_pb2.CheckSuppressionRequest(addresses=["Bob@example.COM", "eve@example.com"])
    )
    assert [(r.address, r.suppressed) for r in check.results] == [
        ("Bob@example.COM", True),
        ("eve@example.com", False),
    ]
    assert check.results[0].suppression.note == "test"

    first = await stubs.suppressions.ListSuppressions(
        suppression_pb2.ListSuppressionsRequest(page_size=2)
    )
    rest = await stubs.suppressions.ListSuppressions(
        suppression_pb2.ListSuppressionsRequest(page_size=2, page_token=first.next_page_token)
    )
    listed = [s.address for s in first.suppressions] + [s.address for s in rest.suppressions]
    assert listed == ["dan@example.com", "carol@example.com", "Bob@example.com"]
    assert rest.next_page_token == ""
    complaints = await stubs.suppressions.ListSuppressions(
        suppression_pb2.ListSuppressionsRequest(reason=suppression_pb2.SUPPRESSION_REASON_COMPLAINT)
    )
    assert [s.address for s in complaints.suppressions] == ["dan@example.com"]

    removed = await stubs.suppressions.RemoveSuppression(
        suppression_pb2.RemoveSuppressionRequest(address="bob@example.com")
    )
    assert not removed.removed  # the local part is case-sensitive: that is another address
    removed = await stubs.suppressions.RemoveSuppression(
        suppression_pb2.RemoveSuppressionRequest(address="Bob@example.com")
    )
    assert removed.removed


async def test_bad_requests_name_their_fields(stubs: Stubs, pg_pool: asyncpg.Pool) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.suppressions.AddSuppression(
            suppression_pb2.AddSuppressionRequest(address="no-at-sign", intent_id="nope")
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err.value)) == {"address", "reason", "intent_id"}
    assert await pg_pool.fetchval("SELECT count(*) FROM suppressions") == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.suppressions.CheckSuppression(suppression_pb2.CheckSuppressionRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_submission_to_a_suppressed_recipient_is_stored_suppressed(
    stubs: Stubs, pg_pool: asyncpg.Pool
) -> None:
    await stubs.templates.CreateTemplate(welcome())
    await add(stubs, "alice@EXAMPLE.com")
    one = await stubs.ingest.SubmitIntent(
        ingest_pb2.SubmitIntentRequest(intent=submission("s-1", recipient="alice@Example.com"))
    )
    assert one.created
    assert one.intent.status == intent_pb2.INTENT_STATUS_SUPPRESSED
    batch = await stubs.ingest.SubmitIntents(
        ingest_pb2.SubmitIntentsRequest(
            intents=[submission("s-2"), submission("s-3", recipient="bob@example.com")]
        )
    )
    statuses = {}
    for result in batch.results:
        got = await stubs.ingest.GetIntent(ingest_pb2.GetIntentRequest(id=result.intent_id))
        statuses[got.intent.recipient] = got.intent.status
    assert statuses == {
        "alice@example.com": intent_pb2.INTENT_STATUS_SUPPRESSED,
        "bob@example.com": intent_pb2.INTENT_STATUS_PENDING,
    }
    leased = await router_repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=10, lease_seconds=30)
    assert [i.recipient for i in leased] == ["bob@example.com"]


async def test_the_lease_never_takes_a_suppressed_recipient(
    stubs: Stubs, pg_pool: asyncpg.Pool, insert_template: object
) -> None:
    # The moment between an insert and its marking (or a suppression committed while the
    # insert was in flight): the row is pending, and only the lease query stands between it
    # and a provider.
    await stubs.templates.CreateTemplate(welcome())
    await insert_intents(pg_pool, [new_intent("raw-1", recipient="zed@example.com")])
    await pg_pool.execute(
        "INSERT INTO suppressions (address, reason) VALUES ('zed@example.com', 'complaint')"
    )
    leased = await router_repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=10, lease_seconds=30)
    assert leased == []
    status = await pg_pool.fetchval("SELECT status::text FROM intents")
    assert status == "pending"


async def test_adding_a_suppression_suppresses_pending_intents(
    stubs: Stubs, pg_pool: asyncpg.Pool
) -> None:
    await stubs.templates.CreateTemplate(welcome())
    await stubs.ingest.SubmitIntents(
        ingest_pb2.SubmitIntentsRequest(
            intents=[
                submission("p-1"),
                submission("p-2"),
                submission("p-3", recipient="b@example.com"),
            ]
        )
    )
    added = await add(stubs, "alice@example.com", suppression_pb2.SUPPRESSION_REASON_UNSUBSCRIBE)
    assert added.suppressed_intents == 2
    rows = await pg_pool.fetch(
        "SELECT recipient, status::text AS s FROM intents ORDER BY recipient"
    )
    assert [(r["recipient"], r["s"]) for r in rows] == [
        ("alice@example.com", "suppressed"),
        ("alice@example.com", "suppressed"),
        ("b@example.com", "pending"),
    ]
