"""The router's client of the SenderService: one call in, one typed outcome per message out.

Everything the router later decides (the intent's next state, provider health, outage
holds, the counters) reads :class:`MessageOutcome` and :class:`BatchOutcome`; nothing else
looks at a ``SendBatchResponse`` or a gRPC status. The mapping of a failed call:

================================  ===================================================
gRPC status of the call           outcome of each of its messages
================================  ===================================================
UNAVAILABLE                       PROVIDER_UNAVAILABLE, ``sender_reached=False``: the
                                  channel had no connection, so nothing was sent
RESOURCE_EXHAUSTED                THROTTLED (the sender shed load before sending)
INVALID_ARGUMENT, NOT_FOUND, ...  TRANSIENT_FAILURE: refused before sending, but a
                                  configuration problem, so it spends attempts
DEADLINE_EXCEEDED, CANCELLED,     UNKNOWN: the request may have reached the provider
INTERNAL, a cut stream, ...
================================  ===================================================

A message the sender answered nothing for is UNKNOWN too; an outcome value this router
does not know is a TRANSIENT_FAILURE.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import grpc

from sluice.v1 import sender_pb2

if TYPE_CHECKING:
    from sluice.v1.sender_pb2_grpc import SenderServiceAsyncStub

__all__ = ["BatchOutcome", "MessageOutcome", "SenderClient", "outcome_name"]

log = logging.getLogger("sluice.router.sender_client")

# The enum's value type (an int at run time); a string, so nothing evaluates it.
Outcome: TypeAlias = "sender_pb2.SendOutcome.ValueType"

# Refused by the sender before anything was sent, for a reason retrying soon will not cure.
_REFUSED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
_KNOWN_OUTCOMES = frozenset(sender_pb2.SendOutcome.values()) - {sender_pb2.SEND_OUTCOME_UNSPECIFIED}
SHED_RETRY_AFTER_SECONDS = 1.0
PROBE_TIMEOUT_SECONDS = 1.0


def outcome_name(outcome: Outcome) -> str:
    """``accepted``, ``throttled``, ... (the enum name without its prefix, lower case)."""
    return sender_pb2.SendOutcome.Name(outcome).removeprefix("SEND_OUTCOME_").lower()


@dataclass(frozen=True, slots=True)
class MessageOutcome:
    """What happened to one message of a SendBatch call."""

    outcome: Outcome
    provider_message_id: str = ""
    retry_after: float = 0.0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """One SendBatch call's result: an outcome for every message it carried.

    ``sender_reached`` is False when the call never reached a sender (nothing was sent, and
    the sender, not the provider, is what is down). ``error`` describes a call that failed
    as a whole. ``seconds`` is how long the call took.
    """

    provider: str
    messages: Mapping[str, MessageOutcome]
    sender_reached: bool = True
    error: str | None = None
    seconds: float = 0.0

    def count(self, outcome: Outcome) -> int:
        """How many messages had ``outcome``."""
        return sum(1 for m in self.messages.values() if m.outcome == outcome)


class SenderClient:
    """Calls SendBatch with the router's timeout and turns every answer into outcomes."""

    def __init__(self, stub: SenderServiceAsyncStub, *, timeout: float) -> None:
        self._stub = stub
        self._timeout = timeout

    async def send(self, request: sender_pb2.SendBatchRequest, request_id: str) -> BatchOutcome:
        """Sends one batch; never raises except CancelledError (the caller then treats the
        messages as UNKNOWN: the call may have been handed over)."""
        ids = [m.intent_id for m in request.messages]
        started = time.monotonic()
        try:
            response = await self._stub.SendBatch(
                request, timeout=self._timeout, metadata=(("x-request-id", request_id),)
            )
        except grpc.aio.AioRpcError as exc:
            error = f"SendBatch to {request.provider} failed: {exc.code().name}: {exc.details()}"
            log.warning("%s", error, extra={"send_request": request_id, "messages": len(ids)})
            outcome, reached, retry_after = _classify(exc.code())
            message = MessageOutcome(outcome, retry_after=retry_after, reason=error)
            return BatchOutcome(
                request.provider,
                dict.fromkeys(ids, message),
                sender_reached=reached,
                error=error,
                seconds=time.monotonic() - started,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not a gRPC status (a bug, a serialisation problem): nothing left this process.
            error = f"SendBatch to {request.provider} failed: {type(exc).__name__}: {exc}"
            log.exception("SendBatch raised", extra={"send_request": request_id})
            message = MessageOutcome(sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE, reason=error)
            return BatchOutcome(
                request.provider, dict.fromkeys(ids, message), error=error, seconds=0.0
            )
        seconds = time.monotonic() - started
        answered = {r.intent_id: r for r in response.results}
        messages: dict[str, MessageOutcome] = {}
        for intent_id in ids:
            r = answered.get(intent_id)
            if r is None:
                messages[intent_id] = MessageOutcome(
                    sender_pb2.SEND_OUTCOME_UNKNOWN,
                    reason="sender returned no result for this message",
                )
            elif r.outcome in _KNOWN_OUTCOMES:
                messages[intent_id] = MessageOutcome(
                    r.outcome,
                    provider_message_id=r.provider_message_id,
                    retry_after=_seconds(r),
                    reason=r.reason,
                )
            else:
                messages[intent_id] = MessageOutcome(
                    sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE,
                    retry_after=_seconds(r),
                    reason=r.reason or f"sender returned outcome {r.outcome}",
                )
        return BatchOutcome(request.provider, messages, seconds=seconds)

    async def probe(self, provider: str | None = None) -> bool:
        """True when the sender answers a cheap call (GetCapacity) for ``provider`` (or for
        the sender itself) within a second."""
        try:
            await self._stub.GetCapacity(
                sender_pb2.GetCapacityRequest(provider=provider or ""),
                timeout=PROBE_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            # Any answer but UNAVAILABLE / a timeout means a sender is there to answer.
            return exc.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        return True


def _classify(code: grpc.StatusCode) -> tuple[Outcome, bool, float]:
    if code == grpc.StatusCode.UNAVAILABLE:
        return sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE, False, 0.0
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return sender_pb2.SEND_OUTCOME_THROTTLED, True, SHED_RETRY_AFTER_SECONDS
    if code in _REFUSED:
        return sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE, True, 0.0
    return sender_pb2.SEND_OUTCOME_UNKNOWN, True, 0.0


def _seconds(result: sender_pb2.SendResult) -> float:
    if not result.HasField("retry_after"):
        return 0.0
    return result.retry_after.seconds + result.retry_after.nanos / 1e9
