"""The dispatcher: the router's lifecycle (workers, reclaimer, prober) around one round.

One round, run by each of ``settings.router_concurrency`` workers in a loop::

    lease(batch_size) -> route (one plan_routes call) -> concurrent SendBatch calls
        -> one Completion per leased intent -> ONE complete() for the lease

No database transaction is open while SendBatch runs; the lease's expiry protects an intent
in flight, and a round that finds its lease too old to send under skips the send. What the
answers mean is decided in :mod:`sluice.router.sender_client` (one typed outcome per
message) and :mod:`sluice.router.outcomes` (the intent's next state); what they say about
providers is kept by :mod:`sluice.router.provider_state`.

An intent whose SendBatch call started is never released: its call may have reached a
provider. A round cancelled mid-gather writes what it knows (the finished calls' outcomes,
and UNKNOWN for the calls cut short) and releases only the intents no call carried; the
write-back runs in a task of its own, shielded from the round's cancellation, and
:meth:`Dispatcher.stop` waits for it before releasing anything.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sluice.common.db import Executor
from sluice.common.providers import ProviderConfig
from sluice.common.telemetry import Telemetry
from sluice.common.templates import TemplateCache, TemplateRow
from sluice.common.unsubscribe import UnsubscribeLinks
from sluice.router import repository
from sluice.router.circuit import CircuitBreakers
from sluice.router.health import ProviderHealthTracker
from sluice.router.metrics import RouterMetrics
from sluice.router.outcomes import URGENT_KIND, RetryPolicy, resolve_batch
from sluice.router.pacing import LocalPacer, Pacer, RedisPacer
from sluice.router.provider_state import OutageClock, ProviderState
from sluice.router.repository import Completion, LeasedIntent
from sluice.router.round import RoundBook, RoundWork, account, write_back
from sluice.router.routing import PlannedBatch
from sluice.router.sender_client import BatchOutcome, MessageOutcome, SenderClient
from sluice.router.settings import RouterSettings
from sluice.router.shared_state import shared_state
from sluice.router.stats import DispatchStats, RoundResult
from sluice.router.tracing import RoundTracing
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
RECLAIM_CHUNK = 1000
SETTLE_TIMEOUT_SECONDS = 5.0
CANCELLED_REASON = "round cancelled while SendBatch was in flight"
_NO_OUTCOME = MessageOutcome(sender_pb2.SEND_OUTCOME_UNKNOWN)


@dataclass
class _Round:
    """A lease in progress: what it holds, which intents a call carried, what is known."""

    lease_id: uuid.UUID
    leased: dict[uuid.UUID, LeasedIntent]
    started: float
    in_flight: dict[int, tuple[PlannedBatch, tuple[LeasedIntent, ...]]] = field(
        default_factory=dict
    )
    completions: list[Completion] = field(default_factory=list)
    writeback: asyncio.Task[int] | None = None


class Dispatcher:
    """Leases, routes, sends and writes back, in ``settings.router_concurrency`` workers.

    :meth:`start` launches the workers, the reclaimer and the outage prober; :meth:`stop`
    shuts them down and settles unfinished rounds. Tests drive single rounds with
    :meth:`run_round`, :meth:`reclaim_once` and :meth:`probe_once` without starting it.
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
        redis: Any = None,
        circuits: CircuitBreakers | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._rng = rng if rng is not None else random.Random()
        rates = {p.name: p.sustained_rate for p in providers}
        pacer: Pacer = (
            RedisPacer(redis, settings.redis_prefix, rates, settings.retry_max_seconds)
            if redis is not None
            else LocalPacer(rates, settings.retry_max_seconds)
        )
        self.state = ProviderState(
            providers,
            health=health if health is not None else ProviderHealthTracker(providers),
            circuits=circuits if circuits is not None else CircuitBreakers(settings.circuit()),
            pacer=pacer,
            outages=self._outage_clock(),
            shared=shared_state(settings, redis, providers, self._outage_clock())
            if redis is not None
            else None,
        )
        self.health = self.state.health
        self.stats = DispatchStats()
        self._pool = pool
        self._client = SenderClient(sender, timeout=settings.sender_timeout_seconds)
        self.book = RoundBook(pool, providers, self.state, self._rng, settings)
        self._tracing = RoundTracing(telemetry)
        self._links = UnsubscribeLinks(
            settings.unsubscribe_base_url,
            settings.unsubscribe_secret,
            ttl_days=settings.unsubscribe_ttl_days,
        )
        self._templates = templates if templates is not None else TemplateCache(pool)
        self._policy = RetryPolicy.from_settings(settings)
        self._stopping = asyncio.Event()
        self._recovered = asyncio.Event()
        # Pulsed when a worker's lease comes back full: workers pacing a trickle lease again.
        self._backlog = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._rounds: dict[uuid.UUID, _Round] = {}

    def _outage_clock(self) -> OutageClock:
        return OutageClock(
            probe_interval=self.settings.outage_probe_seconds,
            hold_max=self.settings.outage_hold_max_seconds,
            rng=self._rng,
        )

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        """The workers, the reclaimer and the prober, for a supervisor to watch."""
        return tuple(self._tasks)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return bool(self._tasks) and not self._stopping.is_set()

    async def start(self) -> None:
        """Launches the workers, the reclaimer and the prober."""
        if self._tasks:
            raise RuntimeError("dispatcher already started")
        self._stopping.clear()
        self._tasks = [
            asyncio.create_task(self._worker(n), name=f"sluice-router-worker-{n}")
            for n in range(self.settings.router_concurrency)
        ]
        self._tasks.append(asyncio.create_task(self._reclaimer(), name="sluice-router-reclaimer"))
        self._tasks.append(asyncio.create_task(self._prober(), name="sluice-router-prober"))
        log.info(
            "dispatcher started",
            extra={
                "workers": self.settings.router_concurrency,
                "batch_size": self.settings.router_batch_size,
            },
        )

    async def stop(self, grace: float) -> None:
        """Stops leasing, waits up to ``grace`` s for rounds in flight, cancels the rest and
        settles what they held (see the module docstring). Safe to call twice."""
        self._stopping.set()
        tasks, self._tasks = self._tasks, []
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(grace, 0.0))
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        rounds, self._rounds = list(self._rounds.values()), {}
        for r in rounds:
            await self._settle(r)
        log.info(
            "dispatcher stopped",
            extra={"sent": sum(self.stats.sent.values()), "released": self.stats.released},
        )

    async def _pause(
        self, seconds: float, *, wake_on_recovery: bool = False, wake_on_backlog: bool = False
    ) -> None:
        """Sleeps ``seconds`` unless stop is requested (or, if asked, a target recovers or
        another worker finds a backlog)."""
        if seconds <= 0:
            return
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if wake_on_recovery:
            waits.append(asyncio.ensure_future(self._recovered.wait()))
        if wake_on_backlog:
            waits.append(asyncio.ensure_future(self._backlog.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _worker(self, number: int) -> None:
        idle = self.settings.router_idle_sleep
        errors = 0
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
            wait = self._after_round(result)
            await self._pause(
                wait.seconds * self._rng.uniform(*wait.jitter),
                wake_on_recovery=wait.until_recovery,
                wake_on_backlog=wait.until_backlog,
            )

    def _after_round(self, result: RoundResult) -> Wait:
        """How long this worker waits now; a full lease also wakes the workers pacing."""
        wait = next_wait(result, self.settings)
        if wait.until_recovery:
            self._recovered.clear()
        if wait.wakes_others:
            # Wakes every worker waiting in ``_pause`` now; clearing at once keeps it a pulse
            # (the waits it woke are already resolved).
            self._backlog.set()
            self._backlog.clear()
        return wait

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

    async def _prober(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.probe_once()
            except Exception:
                log.exception("probing unreachable targets failed")
            await self._pause(self.settings.outage_probe_seconds)

    async def probe_once(self) -> list[str]:
        """Probes every target believed down; releases the intents held for those that
        answer. Returns the targets that recovered."""
        recovered = []
        for target in await self.state.probe_targets():
            provider = None if target.startswith("<") else target
            if await self._client.probe(provider) and await self.state.answered(target):
                recovered.append(target)
        await self._release_held(recovered)
        return recovered

    async def _release_held(self, targets: Sequence[str]) -> None:
        for target in targets:
            released = await repository.release_held(self._pool, target)
            config = self.state.providers.get(target)
            # Intents of a kind it alone serves waited for "a provider", not for it by name.
            for kind in sorted(config.intents) if config is not None else ():
                released += await repository.release_held(self._pool, f"kind:{kind}")
            self.stats.outage_released += released
            log.info("%s answers again: released %d held intents", target, released)
        if targets:
            self._recovered.set()

    # ---- one round -------------------------------------------------------------------------

    async def run_round(self) -> RoundResult:
        """Leases one batch, sends it, writes every result back; returns what happened."""
        lease_id = uuid.uuid4()
        started = time.monotonic()
        leased = await repository.lease(
            self._pool,
            lease_id=lease_id,
            limit=self.settings.router_batch_size,
            lease_seconds=self.settings.lease_seconds,
            campaign_share=self.settings.lease_campaign_share,
        )
        if not leased:
            return RoundResult()
        r = _Round(lease_id, {i.id: i for i in leased}, started)
        self._rounds[lease_id] = r
        tally = _Tally()
        try:
            with self._tracing.dispatch(lease_id, len(leased)):
                await self._route_and_send(r, tally)
        except asyncio.CancelledError:
            raise  # stop() settles what _rounds still holds
        except Exception:
            self._rounds.pop(lease_id, None)
            await self._settle(r)
            raise
        # The write-back is its own task: cancelling this round must not cancel it, or the
        # accepted intents would be left for stop() to release and send again.
        r.writeback = asyncio.create_task(write_back(self._pool, lease_id, r.completions))
        r.in_flight.clear()
        written = await asyncio.shield(r.writeback)
        self._rounds.pop(lease_id, None)
        done = {c.intent_id for c in r.completions}
        if len(done) < len(leased):
            # Sends skipped because the lease grew too old: give back what is still ours.
            rest = [i for i in r.leased if i not in done]
            self.stats.released += await repository.release(self._pool, lease_id=lease_id, ids=rest)
        await self.book.after_write(r.completions, r.leased)
        result = account(self.stats, leased, r.completions, written, tally)
        if self.metrics is not None:
            self.metrics.observe_round(leased, r.completions, time.monotonic() - started)
        log.debug("round %s in %.1f ms", result, (time.monotonic() - started) * 1000)
        return result

    async def _route_and_send(self, r: _Round, tally: _Tally) -> None:
        now = datetime.now(UTC)
        work: RoundWork = await self.book.plan(list(r.leased.values()), now)
        r.completions.extend(work.decided)
        self._tracing.decided(work.decided, r.leased)
        if not work.batches:
            return
        templates = await self._templates.get_many(b.template_id for b in work.batches)
        calls = []
        for n, batch in enumerate(work.batches):
            row = templates.get(batch.template_id)
            if row is None:
                error = f"template {batch.template_id} not found"
                r.completions.extend(
                    Completion(intent_id=i.id, status="failed", last_error=error)
                    for i in batch.intents
                )
                continue
            calls.append(self._send(r, n, batch, row, tally))
        await asyncio.gather(*calls)

    async def _send(
        self, r: _Round, n: int, batch: PlannedBatch, template: TemplateRow, tally: _Tally
    ) -> None:
        # A round whose lease may run out before the call returns sends nothing: another
        # router may already own these intents (this process was paused, or very slow).
        margin = self.settings.lease_seconds - self.settings.sender_timeout_seconds
        if time.monotonic() - r.started > margin * 0.9:
            self.stats.lease_too_old += len(batch.intents)
            log.warning("lease %s too old to send %d intents", r.lease_id, len(batch.intents))
            return  # no completion: settled by release, which checks the lease
        spans, request = self._tracing.request(batch, template)
        if self._links.enabled:
            for message, intent in zip(request.messages, batch.intents, strict=True):
                message.list_unsubscribe_url = self._links.for_intent(intent.id, intent.kind)
        r.in_flight[n] = (batch, batch.intents)
        try:
            outcome = await self._client.send(request, f"{r.lease_id.hex[:12]}-{n}")
        except asyncio.CancelledError:
            self._tracing.abandon(spans)
            raise
        del r.in_flight[n]
        completions = await self._resolve(batch, outcome)
        r.completions.extend(completions)
        tally.note(outcome)
        self._tracing.end(spans, completions)
        if not outcome.sender_reached or outcome.error:
            self.stats.batch_errors += 1

    async def _resolve(self, batch: PlannedBatch, outcome: BatchOutcome) -> list[Completion]:
        kind = batch.intents[0].kind if batch.intents else ""
        recovered = await self.state.observe(outcome, kind)
        if recovered:
            await self._release_held(recovered)
        now = datetime.now(UTC)
        paced = sum(
            1
            for i in batch.intents
            if i.kind != URGENT_KIND
            and outcome.messages.get(str(i.id), _NO_OUTCOME).outcome
            == sender_pb2.SEND_OUTCOME_THROTTLED
        )
        timing = await self.state.timing(outcome, now, paced)
        completions = resolve_batch(
            batch.intents, outcome, now=now, policy=self._policy, rng=self._rng, timing=timing
        )
        return self.book.decorate(batch, completions)

    async def _settle(self, r: _Round) -> None:
        """Finishes a round that did not reach its write-back: the known outcomes and
        UNKNOWN for cut-short calls are written; intents no call carried are released."""
        try:
            if r.writeback is not None:
                await asyncio.wait_for(asyncio.shield(r.writeback), SETTLE_TIMEOUT_SECONDS)
                return
            for batch, intents in r.in_flight.values():
                unknown = MessageOutcome(sender_pb2.SEND_OUTCOME_UNKNOWN, reason=CANCELLED_REASON)
                cut = BatchOutcome(batch.provider, {str(i.id): unknown for i in intents})
                r.completions.extend(await self._resolve(batch, cut))
                self.stats.unknown[batch.provider] += len(intents)
            done = {c.intent_id for c in r.completions}
            rest = [i for i in r.leased if i not in done]
            if r.completions:
                await asyncio.wait_for(
                    write_back(self._pool, r.lease_id, r.completions), SETTLE_TIMEOUT_SECONDS
                )
            if rest:
                self.stats.released += await asyncio.wait_for(
                    repository.release(self._pool, lease_id=r.lease_id, ids=rest),
                    SETTLE_TIMEOUT_SECONDS,
                )
        except Exception:
            # The lease still expires and is reclaimed; nothing is lost, only delayed.
            log.exception("could not settle lease %s", r.lease_id)


class _Tally:
    """What a round's calls said, for how long its worker pauses: the shortest retry-after
    of a throttled message, and how many calls handed nothing over."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.batches = 0
        self.unreachable = 0

    def note(self, outcome: BatchOutcome) -> None:
        self.batches += 1
        values = outcome.messages.values()
        if not outcome.sender_reached or (
            values
            and all(m.outcome == sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE for m in values)
        ):
            self.unreachable += 1
        for m in values:
            if m.outcome == sender_pb2.SEND_OUTCOME_THROTTLED and (
                self.seconds is None or m.retry_after < self.seconds
            ):
                self.seconds = m.retry_after


@dataclass(frozen=True, slots=True)
class Wait:
    """How long a worker waits before its next lease: ``seconds`` scaled by a random factor
    in ``jitter`` (so the workers of many routers do not poll in lockstep), cut short when
    a target recovers if ``until_recovery``, or when another worker of the router finds a
    backlog if ``until_backlog``. ``wakes_others``: this worker found a backlog, so the
    workers waiting ``until_backlog`` lease again now."""

    seconds: float
    jitter: tuple[float, float] = (0.5, 1.5)
    until_recovery: bool = False
    until_backlog: bool = False
    wakes_others: bool = False


def next_wait(result: RoundResult, settings: RouterSettings) -> Wait:
    """What a worker does after ``result``: lease again at once only while the queue has a
    backlog (the lease came back full)."""
    if result.batches and result.unreachable == result.batches and result.sent == 0:
        # Nothing could be handed over: the prober watches the target; wait for it (woken
        # at once when it answers) rather than lease the next batch now.
        return Wait(settings.outage_probe_seconds, (1.0, 2.0), until_recovery=True)
    if result.leased == 0:
        return Wait(settings.router_idle_sleep)
    if result.sent == 0 and result.throttle_pause is not None:
        # Everything we could send was throttled: leasing again at once would only churn
        # rows between pending and leased until the buckets refill.
        return Wait(min(result.throttle_pause, THROTTLE_PAUSE_CAP_SECONDS), (1.0, 1.0))
    # A part-full lease means the queue is keeping up, so arrivals can gather into fewer,
    # larger rounds. A round costs the router, the sender and PostgreSQL a few milliseconds
    # of CPU whatever its size: at 500 intents/s, leasing again at once made rounds of a few
    # intents, about 1 ms of router and sender CPU per intent, and doubled ingest's latency
    # on the same cores. The wait shrinks as the lease fills. It is the router's pacing,
    # shared by its workers: each waits ``concurrency`` times as long, so together they
    # lease about once per idle sleep (with each worker pacing alone, 4 workers made four
    # times the rounds, each a quarter as full, for twice the router and sender CPU per
    # intent). A full lease (a backlog) leases again at once and wakes the waiting workers.
    if result.leased >= settings.router_batch_size:
        return Wait(0.0, wakes_others=True)
    fill = 1.0 - result.leased / settings.router_batch_size
    return Wait(settings.router_idle_sleep * fill * settings.router_concurrency, until_backlog=True)
