"""The dispatcher: the router's loops that lease due intents, send them, and write back.

One round, run by each of ``settings.router_concurrency`` workers in a loop::

    lease(batch_size) -> route -> templates (cached) -> concurrent SendBatch calls
        -> one Completion per leased intent -> ONE complete() for the lease

No database transaction is open while SendBatch runs: the lease is its own committed
statement and so is the write-back (the seed held one transaction across provider calls).
The lease's expiry is what protects an intent while it is in flight; the settings keep the
sender timeout shorter than the lease.

A separate reclaimer turns leases that ran out (a router crashed) back into pending intents.

Shutdown (:meth:`Dispatcher.stop`): stop leasing, let rounds in flight finish within the
grace period, cancel what is left, and give back (release) the leases still held, so another
router picks those intents up at once instead of after the lease expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc
from opentelemetry import trace

from sluice.common.db import Executor
from sluice.common.errors import Unavailable
from sluice.common.providers import ProviderConfig
from sluice.common.telemetry import Telemetry, context_from_traceparent, current_traceparent
from sluice.common.templates import TemplateCache, TemplateRow
from sluice.router import repository
from sluice.router.health import ProviderHealthTracker
from sluice.router.metrics import RouterMetrics
from sluice.router.repository import Completion, LeasedIntent
from sluice.router.routing import (
    SENDER_TARGET,
    OutageBackoff,
    PlannedBatch,
    ProviderChooser,
    RetryPolicy,
    ThrottlePacer,
    plan_routes,
    resolve_batch,
    resolve_batch_failure,
    retry_after_seconds,
)
from sluice.router.settings import RouterSettings
from sluice.router.stats import DispatchStats, RoundResult
from sluice.router.tracing import _batch_link, _end_route_span
from sluice.v1 import sender_pb2

if TYPE_CHECKING:
    from sluice.v1.sender_pb2_grpc import SenderServiceAsyncStub

__all__ = ["DispatchStats", "Dispatcher", "RoundResult", "TemplateCache"]

log = logging.getLogger("sluice.router.dispatch")

# After a round in which everything was throttled, wait for the sender's shortest
# retry-after, but never longer than this: other intents (other providers) may be due.
THROTTLE_PAUSE_CAP_SECONDS = 5.0
# Back-off of a worker whose round failed (database down): idle_sleep * 2**n, capped.
ERROR_PAUSE_CAP_SECONDS = 30.0
# Reclaim in chunks so one statement never locks a huge number of rows.
RECLAIM_CHUNK = 1000
RELEASE_TIMEOUT_SECONDS = 5.0


class Dispatcher:
    """Leases, routes, sends and writes back, in ``settings.router_concurrency`` workers.

    Build it with the router's resources; :meth:`start` launches the workers and the
    reclaimer, :meth:`stop` shuts them down and gives back unfinished leases. Tests can drive
    single rounds with :meth:`run_round` and :meth:`reclaim_once` without starting it.
    """

    def __init__(
        self,
        settings: RouterSettings,
        pool: Executor,
        sender: SenderServiceAsyncStub,
        providers: Sequence[ProviderConfig],
        telemetry: Telemetry,
        *,
        health: ProviderHealthTracker | None = None,
        templates: TemplateCache | None = None,
        rng: random.Random | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.health = health if health is not None else ProviderHealthTracker(providers)
        self.stats = DispatchStats()
        self._pool = pool
        self._sender = sender
        self._chooser = ProviderChooser(providers)
        self._telemetry = telemetry
        self._tracing = telemetry.enabled
        self._templates = templates if templates is not None else TemplateCache(pool)
        self._policy = RetryPolicy.from_settings(settings)
        self._pacer = ThrottlePacer(
            {p.name: p.sustained_rate for p in providers}, max_spread=settings.retry_max_seconds
        )
        self._outage = OutageBackoff(self._policy)
        self._rng = rng if rng is not None else random.Random()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # lease id -> intents still under it, for release on shutdown.
        self._held: dict[uuid.UUID, list[uuid.UUID]] = {}

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        """The workers and the reclaimer, for a supervisor to watch."""
        return tuple(self._tasks)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return bool(self._tasks) and not self._stopping.is_set()

    async def start(self) -> None:
        """Launches the workers and the reclaimer."""
        if self._tasks:
            raise RuntimeError("dispatcher already started")
        self._stopping.clear()
        self._tasks = [
            asyncio.create_task(self._worker(n), name=f"sluice-router-worker-{n}")
            for n in range(self.settings.router_concurrency)
        ]
        self._tasks.append(asyncio.create_task(self._reclaimer(), name="sluice-router-reclaimer"))
        log.info(
            "dispatcher started",
            extra={
                "workers": self.settings.router_concurrency,
                "batch_size": self.settings.router_batch_size,
            },
        )

    async def stop(self, grace: float) -> None:
        """Stops leasing, waits up to ``grace`` s for rounds in flight, cancels the rest and
        releases the leases they held. Safe to call twice."""
        self._stopping.set()
        tasks, self._tasks = self._tasks, []
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(grace, 0.0))
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._release_held()
        log.info(
            "dispatcher stopped",
            extra={"sent": sum(self.stats.sent.values()), "released": self.stats.released},
        )

    async def _release_held(self) -> None:
        held, self._held = self._held, {}
        for lease_id, ids in held.items():
            try:
                released = await asyncio.wait_for(
                    repository.release(self._pool, lease_id=lease_id, ids=ids),
                    RELEASE_TIMEOUT_SECONDS,
                )
            except Exception:
                # The lease still expires and gets reclaimed; nothing is lost, only delayed.
                log.exception("could not release %d leased intents", len(ids))
            else:
                self.stats.released += released

    async def _pause(self, seconds: float) -> None:
        """Sleeps ``seconds`` unless stop is requested first."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _worker(self, number: int) -> None:
        idle = self.settings.router_idle_sleep
        errors = outages = 0
        while not self._stopping.is_set():
            try:
                result = await self.run_round()
            except Exception:
                errors += 1
                self.stats.round_errors += 1
                log.exception("dispatch round failed (worker %d, %d in a row)", number, errors)
                pause = min(ERROR_PAUSE_CAP_SECONDS, max(idle, 0.05) * 2.0 ** min(errors, 16))
                await self._pause(pause * self._rng.uniform(0.5, 1.0))
                continue
            errors = 0
            if result.batches and result.unreachable == result.batches and result.sent == 0:
                # Nothing could be handed over (sender or provider down): back off like an
                # error streak instead of leasing the next batch at once.
                outages += 1
                if outages == 1:
                    log.warning("worker %d: nothing could be handed over; backing off", number)
                pause = min(ERROR_PAUSE_CAP_SECONDS, max(idle, 0.05) * 2.0 ** min(outages, 16))
                await self._pause(pause * self._rng.uniform(0.5, 1.0))
                continue
            outages = 0
            if result.leased == 0:
                # Jitter keeps idle workers of many routers from polling in lockstep.
                await self._pause(idle * self._rng.uniform(0.5, 1.5))
            elif result.sent == 0 and result.throttle_pause is not None:
                # Everything we could send was throttled: leasing again at once would only
                # churn rows between pending and leased until the buckets refill.
                await self._pause(min(result.throttle_pause, THROTTLE_PAUSE_CAP_SECONDS))

    async def _reclaimer(self) -> None:
        interval = self.settings.lease_seconds / 3
        while not self._stopping.is_set():
            try:
                await self.reclaim_once()
            except Exception:
                log.exception("reclaiming expired leases failed")
            await self._pause(interval * self._rng.uniform(0.9, 1.1))

    async def reclaim_once(self) -> int:
        """Returns every expired lease to pending, in chunks; returns how many."""
        total = 0
        while True:
            count = await repository.reclaim_expired(self._pool, limit=RECLAIM_CHUNK)
            total += count
            if count < RECLAIM_CHUNK or self._stopping.is_set():
                break
        if total:
            self.stats.reclaimed += total
            if self.metrics is not None:
                self.metrics.observe_reclaimed(total)
            log.info("reclaimed %d expired leases", total)
        return total

    # ---- one round -------------------------------------------------------------------------

    async def run_round(self) -> RoundResult:
        """Leases one batch, sends it, writes every result back; returns what happened."""
        lease_id = uuid.uuid4()
        leased = await repository.lease(
            self._pool,
            lease_id=lease_id,
            limit=self.settings.router_batch_size,
            lease_seconds=self.settings.lease_seconds,
        )
        if not leased:
            return RoundResult()
        started = time.perf_counter()
        tally = _RoundTally()
        self._held[lease_id] = [i.id for i in leased]
        try:
            if self._tracing:
                with self._telemetry.tracer.start_as_current_span(
                    "sluice.dispatch",
                    attributes={"sluice.lease_id": str(lease_id), "sluice.leased": len(leased)},
                ):
                    completions = await self._route_and_send(lease_id, leased, tally)
            else:
                completions = await self._route_and_send(lease_id, leased, tally)
        except asyncio.CancelledError:
            raise  # stop() releases what is still in _held
        except Exception:
            await self._release_now(lease_id)
            raise
        # From here the sends happened: the results must be written, never released (a
        # release would send accepted intents again).
        try:
            written = await self._complete(lease_id, completions)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The write-back failed for good; the lease expires and the reclaimer returns the
            # intents, which is the duplicate window promise 5 allows.
            self._held.pop(lease_id, None)
            raise
        self._held.pop(lease_id, None)
        result = self._account(
            leased, completions, written, tally.seconds, tally.batches, tally.unreachable
        )
        if self.metrics is not None:
            self.metrics.observe_round(leased, completions, time.perf_counter() - started)
        log.debug(
            "round leased=%d sent=%d throttled=%d retrying=%d failed=%d expired=%d "
            "written=%d in %.1f ms",
            result.leased,
            result.sent,
            result.throttled,
            result.retrying,
            result.failed,
            result.expired,
            result.written,
            (time.perf_counter() - started) * 1000,
        )
        return result

    async def _release_now(self, lease_id: uuid.UUID) -> None:
        ids = self._held.pop(lease_id, [])
        try:
            self.stats.released += await repository.release(self._pool, lease_id=lease_id, ids=ids)
        except Exception:
            log.exception("could not release %d leased intents after a failed round", len(ids))

    async def _route_and_send(
        self, lease_id: uuid.UUID, leased: Sequence[LeasedIntent], tally: _RoundTally
    ) -> list[Completion]:
        plan = plan_routes(
            leased, self._chooser, now=datetime.now(UTC), degraded=self.health.degraded()
        )
        completions = list(plan.decided)
        if self._tracing and plan.decided:
            by_id = {i.id: i for i in leased}
            for c in plan.decided:
                self._decided_span(c, by_id[c.intent_id])
        if not plan.batches:
            return completions
        templates = await self._templates.get_many(b.template_id for b in plan.batches)
        calls = []
        for n, batch in enumerate(plan.batches):
            row = templates.get(batch.template_id)
            if row is None:
                error = f"template {batch.template_id} not found"
                completions.extend(
                    Completion(intent_id=i.id, status="failed", last_error=error)
                    for i in batch.intents
                )
                continue
            calls.append(
                self._send(batch, _template_content(row), f"{lease_id.hex[:12]}-{n}", tally)
            )
        for batch_completions in await asyncio.gather(*calls):
            completions.extend(batch_completions)
        return completions

    async def _send(
        self,
        batch: PlannedBatch,
        template: sender_pb2.TemplateContent,
        request_id: str,
        tally: _RoundTally,
    ) -> list[Completion]:
        spans: list[trace.Span] = []
        if self._tracing:
            messages = []
            for intent in batch.intents:
                span, traceparent = self._route_span(intent, batch.provider)
                spans.append(span)
                messages.append(_message(intent, traceparent))
        else:
            messages = [_message(intent, "") for intent in batch.intents]
        request = sender_pb2.SendBatchRequest(
            provider=batch.provider, template=template, messages=messages
        )
        error: str | None = None
        reached_provider = True
        try:
            response = await self._sender.SendBatch(
                request,
                timeout=self.settings.sender_timeout_seconds,
                metadata=(("x-request-id", request_id),),
            )
        except grpc.aio.AioRpcError as exc:
            error = f"SendBatch to {batch.provider} failed: {exc.code().name}: {exc.details()}"
            reached_provider = exc.code() != grpc.StatusCode.UNAVAILABLE
            log.warning("%s", error, extra={"send_request": request_id, "messages": len(messages)})
        except asyncio.CancelledError:
            for span in spans:
                span.end()
            raise
        except Exception as exc:
            # Not a gRPC status (a bug, a serialisation problem): fail this batch only, not
            # the other batches of the lease whose results are already in.
            error = f"SendBatch to {batch.provider} failed: {type(exc).__name__}: {exc}"
            log.exception("SendBatch raised", extra={"send_request": request_id})
        now = datetime.now(UTC)
        tally.batches += 1
        if error is None:
            self._outage.record(SENDER_TARGET, reachable=True)
            outcomes = {r.outcome for r in response.results}
            if outcomes == {sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE}:
                tally.unreachable += 1
                self._outage.record(batch.provider, reachable=False)
            elif sender_pb2.SEND_OUTCOME_ACCEPTED in outcomes:
                self._outage.record(batch.provider, reachable=True)
            completions = resolve_batch(
                batch,
                response.results,
                now=now,
                policy=self._policy,
                rng=self._rng,
                pacer=self._pacer,
                outage=self._outage,
            )
            tally.note(response.results)
            self._record_health(batch, response.results)
        else:
            self.stats.batch_errors += 1
            if not reached_provider:
                tally.unreachable += 1
                self._outage.record(SENDER_TARGET, reachable=False)
            completions = resolve_batch_failure(
                batch,
                error,
                now=now,
                policy=self._policy,
                rng=self._rng,
                reached_provider=reached_provider,
                outage=self._outage,
            )
            if reached_provider:
                # An unreachable sender says nothing about the provider's health.
                self.health.record(batch.provider, failed=len(batch.intents))
        if spans:
            # Both resolvers answer in batch.intents order, the order the spans were made in.
            for span, c in zip(spans, completions, strict=True):
                _end_route_span(span, c)
        return completions

    def _record_health(self, batch: PlannedBatch, results: Sequence[sender_pb2.SendResult]) -> None:
        # Throttling says the limiter works and a permanent failure says the message is bad;
        # neither says anything about the provider. Everything else that is not an
        # acceptance (transient, unspecified, missing) counts against it.
        outcomes = Counter(r.outcome for r in results)
        accepted = outcomes[sender_pb2.SEND_OUTCOME_ACCEPTED]
        neutral = (
            outcomes[sender_pb2.SEND_OUTCOME_THROTTLED]
            + outcomes[sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE]
        )
        failed = max(0, len(batch.intents) - accepted - neutral)
        self.health.record(batch.provider, accepted=accepted, failed=failed)

    def _route_span(self, intent: LeasedIntent, provider: str) -> tuple[trace.Span, str]:
        """Starts the intent's ``sluice.route`` span as a child of its submitting call."""
        span = self._telemetry.tracer.start_span(
            "sluice.route",
            context=context_from_traceparent(intent.traceparent),
            attributes={
                "sluice.intent_id": str(intent.id),
                "sluice.intent": intent.kind,
                "sluice.provider": provider,
                "sluice.attempt": intent.attempts + 1,
            },
            links=_batch_link(),
        )
        with trace.use_span(span, end_on_exit=False):
            traceparent = current_traceparent()
        return span, traceparent

    def _decided_span(self, completion: Completion, intent: LeasedIntent) -> None:
        """A ``sluice.route`` span for an intent decided without sending (expired, no
        provider), so its trace shows why it stopped."""
        span = self._telemetry.tracer.start_span(
            "sluice.route",
            context=context_from_traceparent(intent.traceparent),
            attributes={"sluice.intent_id": str(intent.id), "sluice.intent": intent.kind},
            links=_batch_link(),
        )
        _end_route_span(span, completion)

    async def _complete(self, lease_id: uuid.UUID, completions: Sequence[Completion]) -> int:
        """One write-back for the whole lease, retried on connection errors while the lease
        is still comfortably alive."""
        deadline = time.monotonic() + self.settings.lease_seconds * 0.5
        delay = 0.1
        while True:
            try:
                return await repository.complete(
                    self._pool, lease_id=lease_id, completions=completions
                )
            except Unavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("write-back failed, retrying in %.1f s: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _account(
        self,
        leased: Sequence[LeasedIntent],
        completions: Sequence[Completion],
        written: int,
        throttle_pause: float | None,
        batches: int = 0,
        unreachable: int = 0,
    ) -> RoundResult:
        stats = self.stats
        stats.rounds += 1
        stats.leased += len(leased)
        sent = throttled = retrying = failed = expired = 0
        for c in completions:
            if c.status == "sent":
                sent += 1
                stats.sent[c.provider or ""] += 1
            elif c.status == "pending" and not c.attempted and c.last_error is None:
                # Throttled: no attempt and no error (an unreachable sender sets an error).
                throttled += 1
                stats.throttled[c.provider or ""] += 1
            elif c.status == "pending":
                retrying += 1
                stats.retrying[c.provider or ""] += 1
            elif c.status == "failed":
                failed += 1
                stats.failed_by_provider[c.provider or ""] += 1
            else:
                expired += 1
        stats.failed += failed
        stats.expired += expired
        if written < len(completions):
            # Another router leased some of these after our lease ran out: its results win.
            stats.results_dropped += len(completions) - written
            log.warning(
                "%d of %d results not written: the lease was lost",
                len(completions) - written,
                len(completions),
            )
        return RoundResult(
            leased=len(leased),
            sent=sent,
            throttled=throttled,
            retrying=retrying,
            failed=failed,
            expired=expired,
            written=written,
            throttle_pause=throttle_pause,
            batches=batches,
            unreachable=unreachable,
        )


class _RoundTally:
    """What a round's SendBatch calls said, for deciding how long the worker pauses.

    ``seconds`` is the shortest retry-after the sender gave (None: nothing throttled): the
    pause after an all-throttled round waits for the limiter itself, not for the throttled
    intents' own due times, which the pacer spreads far beyond it. ``unreachable`` counts
    the calls that handed nothing over (the sender, or the provider, was down).
    """

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.batches = 0
        self.unreachable = 0

    def note(self, results: Sequence[sender_pb2.SendResult]) -> None:
        for r in results:
            if r.outcome == sender_pb2.SEND_OUTCOME_THROTTLED:
                wait = retry_after_seconds(r)
                if self.seconds is None or wait < self.seconds:
                    self.seconds = wait


def _template_content(row: TemplateRow) -> sender_pb2.TemplateContent:
    return sender_pb2.TemplateContent(
        id=row.id,
        version=row.version,
        subject=row.subject,
        html_body=row.html_body,
        text_body=row.text_body,
        variables=list(row.variables),
        from_address=row.from_address,
    )


def _message(intent: LeasedIntent, traceparent: str) -> sender_pb2.OutboundMessage:
    intent_id = str(intent.id)
    return sender_pb2.OutboundMessage(
        intent_id=intent_id,
        recipient=intent.recipient,
        variables=intent.variables,
        # The intent id, not the client's key: unique per intent and stable across retries,
        # which is what a provider's idempotency key needs.
        idempotency_key=intent_id,
        traceparent=traceparent,
    )
