"""SuppressionService: the addresses Sluice never sends to."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import grpc

from sluice.common.errors import InvalidArgument
from sluice.common.model import to_timestamp
from sluice.ingest import page_tokens as paging
from sluice.ingest import suppression_repository as repo
from sluice.ingest.suppression_repository import Suppression
from sluice.ingest.validation import normalize_recipient
from sluice.v1 import suppression_pb2, suppression_pb2_grpc

REASON_TO_PROTO: dict[str, suppression_pb2.SuppressionReason.ValueType] = {
    "hard_bounce": suppression_pb2.SUPPRESSION_REASON_HARD_BOUNCE,
    "complaint": suppression_pb2.SUPPRESSION_REASON_COMPLAINT,
    "manual": suppression_pb2.SUPPRESSION_REASON_MANUAL,
    "unsubscribe": suppression_pb2.SUPPRESSION_REASON_UNSUBSCRIBE,
    "soft_bounce": suppression_pb2.SUPPRESSION_REASON_SOFT_BOUNCE,
}
PROTO_TO_REASON: dict[int, str] = {int(v): k for k, v in REASON_TO_PROTO.items()}
MAX_NOTE = 1000
MAX_PROVIDER = 64
MAX_CHECK = 1000


def suppression_to_proto(s: Suppression) -> suppression_pb2.Suppression:
    """The wire form of a suppression."""
    msg = suppression_pb2.Suppression(
        address=s.address,
        reason=REASON_TO_PROTO[s.reason],
        provider=s.provider or "",
        intent_id=str(s.intent_id) if s.intent_id else "",
        note=s.note,
    )
    ts = to_timestamp(s.created_at)
    if ts is not None:
        msg.create_time.CopyFrom(ts)
    return msg


def _address(raw: str, field: str, bad: list[tuple[str, str]]) -> str:
    if not raw:
        bad.append((field, "required"))
        return ""
    try:
        return normalize_recipient(raw)
    except ValueError as exc:
        bad.append((field, str(exc)))
        return ""


def _raise_if(bad: list[tuple[str, str]]) -> None:
    if bad:
        raise InvalidArgument("; ".join(f"{f}: {d}" for f, d in bad), bad)


class SuppressionServicer(suppression_pb2_grpc.SuppressionServiceServicer):
    """Adds, removes, lists and checks suppressed addresses."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def AddSuppression(
        self, request: suppression_pb2.AddSuppressionRequest, context: grpc.aio.ServicerContext
    ) -> suppression_pb2.AddSuppressionResponse:
        bad: list[tuple[str, str]] = []
        address = _address(request.address, "address", bad)
        reason = PROTO_TO_REASON.get(int(request.reason))
        if reason is None:
            bad.append(("reason", "required: a SuppressionReason other than UNSPECIFIED"))
        if len(request.note) > MAX_NOTE:
            bad.append(("note", f"at most {MAX_NOTE} characters"))
        if len(request.provider) > MAX_PROVIDER:
            bad.append(("provider", f"at most {MAX_PROVIDER} characters"))
        intent_id: uuid.UUID | None = None
        if request.intent_id:
            try:
                intent_id = uuid.UUID(request.intent_id)
            except ValueError:
                bad.append(("intent_id", "a UUID, or empty"))
        _raise_if(bad)
        assert reason is not None
        entry, created, marked = await repo.add(
            self._pool,
            address=address,
            reason=reason,
            provider=request.provider or None,
            intent_id=intent_id,
            note=request.note,
        )
        return suppression_pb2.AddSuppressionResponse(
            suppression=suppression_to_proto(entry), created=created, suppressed_intents=marked
        )

    async def RemoveSuppression(
        self,
        request: suppression_pb2.RemoveSuppressionRequest,
        context: grpc.aio.ServicerContext,
    ) -> suppression_pb2.RemoveSuppressionResponse:
        bad: list[tuple[str, str]] = []
        address = _address(request.address, "address", bad)
        _raise_if(bad)
        removed = await repo.remove(self._pool, address)
        return suppression_pb2.RemoveSuppressionResponse(removed=removed)

    async def ListSuppressions(
        self, request: suppression_pb2.ListSuppressionsRequest, context: grpc.aio.ServicerContext
    ) -> suppression_pb2.ListSuppressionsResponse:
        size = paging.page_size(request.page_size)
        reason = PROTO_TO_REASON.get(int(request.reason)) if request.reason else None
        if request.reason and reason is None:
            _raise_if([("reason", "not a SuppressionReason value")])
        filters = paging.fingerprint("suppressions", reason)
        after: tuple[datetime, str] | None = None
        if request.page_token:
            position = paging.decode(request.page_token, filters)
            try:
                after = (datetime.fromisoformat(position[0]), str(position[1]))
            except (ValueError, IndexError, TypeError):
                _raise_if([("page_token", "not a token this server issued")])
        rows = await repo.list_suppressions(self._pool, limit=size + 1, reason=reason, after=after)
        page = rows[:size]
        token = ""
        if len(rows) > size:
            last = page[-1]
            token = paging.encode([last.created_at.isoformat(), last.address], filters)
        return suppression_pb2.ListSuppressionsResponse(
            suppressions=[suppression_to_proto(s) for s in page], next_page_token=token
        )

    async def CheckSuppression(
        self, request: suppression_pb2.CheckSuppressionRequest, context: grpc.aio.ServicerContext
    ) -> suppression_pb2.CheckSuppressionResponse:
        given = list(request.addresses)
        bad: list[tuple[str, str]] = []
        if not given:
            bad.append(("addresses", "at least one address"))
        elif len(given) > MAX_CHECK:
            bad.append(("addresses", f"at most {MAX_CHECK} addresses"))
        normalised = [_address(a, f"addresses[{i}]", bad) for i, a in enumerate(given)]
        _raise_if(bad)
        found = await repo.check(self._pool, sorted(set(normalised)))
        results = []
        for raw, address in zip(given, normalised, strict=True):
            result = suppression_pb2.SuppressionCheck(address=raw, suppressed=address in found)
            if address in found:
                result.suppression.CopyFrom(suppression_to_proto(found[address]))
            results.append(result)
        return suppression_pb2.CheckSuppressionResponse(results=results)
