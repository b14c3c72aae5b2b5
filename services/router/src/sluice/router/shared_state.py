"""Circuit breakers, outage clocks and the router count, shared by every router through
Redis, so R routers open a circuit once, probe it once, time an outage from when the first
of them saw it, and each plans with 1/R of every provider's capacity.

One :meth:`SharedState.sync` per round is one pipelined round trip: a Lua script per
target (:data:`~sluice.router.shared_scripts.SYNC`) adds the samples this router gathered
since its last sync to the shared one-second buckets, opens or closes circuits, hands out
half-open and outage probes (one router per probe interval), and answers every circuit's
state; one more script counts the routers heard from lately. The only other calls are
the rare transitions: a target first seen down (:meth:`SharedState.down`) and a target
answering again (:meth:`SharedState.up`, which tells exactly one router to release what
was held for it).

Redis down must not stop routing: a failed or slow (over :data:`REDIS_TIMEOUT_SECONDS`)
call switches this router to its own circuits and outage clock (they are always fed, so
they are warm) for :data:`RETRY_SECONDS` before Redis is tried again; the switch is logged
both ways and counted (:attr:`SharedState.failures`, :attr:`SharedState.active`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from sluice.common.providers import ProviderConfig
from sluice.router.circuit import CircuitConfig, CircuitState
from sluice.router.outcomes import SENDER_TARGET
from sluice.router.provider_state import OutageClock
from sluice.router.settings import RouterSettings
from sluice.router.shared_scripts import DOWN, ROUTERS, SYNC, UP

__all__ = [
    "REDIS_TIMEOUT_SECONDS",
    "RETRY_SECONDS",
    "SharedState",
    "SharedView",
    "shared_state",
    "target_key",
]

log = logging.getLogger("sluice.router.shared_state")

# A round never waits longer than this for Redis: routing on local state beats stalling.
REDIS_TIMEOUT_SECONDS = 0.25
# After a failure, Redis is left alone this long (a hung Redis must not cost every round).
RETRY_SECONDS = 1.0
# A router not heard from for this long no longer counts towards the capacity shares.
ROUTER_ALIVE_SECONDS = 10.0
# What a Redis call may raise: the client's errors, the socket's, the timeout, an odd reply.
_FAILURES = (RedisError, OSError, TimeoutError, ValueError, TypeError, IndexError)
PROVIDER_CIRCUIT = "*"
# Sample buckets per circuit over the circuit's max_age (60 s: twelve of 5 s).
BUCKETS = 12  # the provider-wide circuit's name in Redis
_STATUS = {
    0: CircuitState.CLOSED,
    1: CircuitState.OPEN,
    2: CircuitState.HALF_OPEN,
    3: CircuitState.HALF_OPEN,
}
_EVENTS = {1: CircuitState.OPEN, 2: CircuitState.CLOSED}


def target_key(prefix: str, target: str) -> str:
    """The Redis hash of one target (a provider, or the sender), hash-tagged by name."""
    return f"{prefix}:target:{{{target}}}"


@dataclass(frozen=True, slots=True)
class SharedView:
    """What one sync answered: per ``(provider, kind)`` circuit (kind '' for the provider)
    whether this router must keep away from it now, and the outage probes it took."""

    closed: frozenset[tuple[str, str]]
    probes: tuple[str, ...]


class _Samples:
    """Samples of one circuit gathered since the last sync."""

    __slots__ = ("batches", "failed", "good", "latency_ms")

    def __init__(self) -> None:
        self.good = self.failed = self.batches = self.latency_ms = 0


class SharedState:
    """This router's side of the shared state; one event loop, no locks."""

    def __init__(
        self,
        redis: Any,
        prefix: str,
        served: Mapping[str, Iterable[str]],
        extra_targets: Iterable[str],
        config: CircuitConfig,
        *,
        probe_interval: float,
        hold_max: float,
        router_id: str,
        outages: OutageClock,
        redis_timeout: float = REDIS_TIMEOUT_SECONDS,
    ) -> None:
        self._redis = redis
        self._timeout = redis_timeout
        self._prefix = prefix
        self._circuits = {name: ("", *sorted(kinds)) for name, kinds in served.items()}
        self._targets = [*self._circuits, *extra_targets]
        self._probe_ms = int(probe_interval * 1000)
        self._ttl_ms = int(2000 * max(config.max_age, config.cooldown, hold_max) + 60_000)
        span = max(1, math.ceil(config.max_age / BUCKETS))
        # the arguments every sync repeats (see shared_scripts.SYNC)
        self._fixed = [
            str(int(config.cooldown * 1000)),
            str(int(config.probe_every * 1000)),
            repr(config.threshold),
            str(int(config.max_latency * 1000)),
            str(config.min_samples),
            str(config.window),
            str(max(1, math.ceil(config.max_age / span))),
            str(span),
            str(config.close_after),
            str(self._ttl_ms),
        ]
        self._id = router_id
        self._scripts = {"sync": SYNC, "down": DOWN, "up": UP, "routers": ROUTERS}
        self._sha = {name: redis.register_script(text).sha for name, text in self._scripts.items()}
        self._pending: dict[tuple[str, str], _Samples] = {}
        self._retry_at = 0.0
        #: the outage clock as Redis has it (times converted to this process's clock)
        self.outages = outages
        #: circuit states as of the last sync, per (provider, kind or '')
        self.states: dict[tuple[str, str], CircuitState] = {}
        #: routers heard from lately (the last count known, while Redis is away)
        self.routers = 1
        #: False while this router runs on its own state because Redis did not answer
        self.active = True
        #: Redis calls that failed; circuit transitions this router's syncs made
        self.failures = 0
        self.transitions: Counter[tuple[str, str, str]] = Counter()

    # ---- samples and transitions --------------------------------------------------------

    def record(self, provider: str, kind: str, *, ok: int, failed: int, seconds: float) -> None:
        """One batch's samples, sent with the next sync (no I/O here)."""
        if provider not in self._circuits or (ok <= 0 and failed <= 0):
            return
        for circuit in {"", kind}:
            s = self._pending.get((provider, circuit))
            if s is None:
                s = self._pending[(provider, circuit)] = _Samples()
            s.good += max(ok, 0)
            s.failed += max(failed, 0)
            s.batches += 1
            s.latency_ms += int(seconds * 1000)

    async def down(self, target: str) -> bool:
        """Notes ``target`` unreachable for every router; False when Redis did not answer."""
        replies = await self._call("down", target, [self._ttl_ms])
        if replies is None:
            return False
        now_ms, since_ms = (int(v) for v in replies[0])
        self.outages.assume(target, (now_ms - since_ms) / 1000)
        return True

    async def up(self, target: str) -> bool | None:
        """Notes ``target`` reachable; True for the one router that saw it down first after
        the outage (it releases what was held), None when Redis did not answer."""
        replies = await self._call("up", target, [])
        if replies is None:
            return None
        self.outages.up(target)
        return bool(int(replies[0]))

    # ---- the per-round sync -------------------------------------------------------------

    async def sync(
        self, kinds: Iterable[str] = (), *, probe_outages: bool = False
    ) -> SharedView | None:
        """One round trip: sends the pending samples, takes half-open probes for ``kinds``
        (and outage probes with ``probe_outages``), and reads every circuit and outage.
        None when Redis did not answer (use local state)."""
        if not self._ready():
            return None
        wanted = set(kinds)
        pending, self._pending = self._pending, {}
        calls: list[tuple[str, str, list[Any]]] = [
            (
                "sync",
                target_key(self._prefix, t),
                self._sync_args(t, wanted, pending, probe_outages),
            )
            for t in self._targets
        ]
        calls.append(("routers", self.routers_key, [self._id, int(ROUTER_ALIVE_SECONDS * 1000)]))
        try:
            replies = await asyncio.wait_for(self._pipeline(calls), self._timeout)
            view = self._read(replies[:-1])
            self.routers = max(1, int(replies[-1]))
        except _FAILURES as exc:  # route on local state
            self._failed(exc)
            return None
        self._succeeded()
        return view

    def _sync_args(
        self,
        target: str,
        wanted: set[str],
        pending: Mapping[tuple[str, str], _Samples],
        probe_outages: bool,
    ) -> list[str]:
        args = [self._id, *self._fixed, str(self._probe_ms if probe_outages else 0)]
        for circuit in self._circuits.get(target, ()):
            claim = "1" if wanted and (circuit == "" or circuit in wanted) else "0"
            s = pending.get((target, circuit)) or _Samples()
            name = circuit or PROVIDER_CIRCUIT
            args += [name, claim, str(s.good), str(s.failed), str(s.batches), str(s.latency_ms)]
        return args

    def _read(self, replies: list[Any]) -> SharedView:
        closed: set[tuple[str, str]] = set()
        probes: list[str] = []
        down: dict[str, float] = {}
        for target, reply in zip(self._targets, replies, strict=True):
            values = [int(v) for v in reply]
            now_ms, since_ms, probed = values[:3]
            if since_ms >= 0:
                down[target] = (now_ms - since_ms) / 1000
            if probed:
                probes.append(target)
            circuits = self._circuits.get(target, ())
            for circuit, (status, event) in zip(circuits, _pairs(values[3:]), strict=True):
                self.states[(target, circuit)] = _STATUS[status]
                if status in (1, 2):
                    closed.add((target, circuit))
                if event:
                    self._transition(target, circuit, _EVENTS[event])
        self.outages.replace(down)
        return SharedView(closed=frozenset(closed), probes=tuple(probes))

    def _transition(self, provider: str, kind: str, to: CircuitState) -> None:
        # Only the router whose sync made the change logs and counts it: once for all.
        self.transitions[(provider, kind, to.value)] += 1
        what = f"{provider} ({kind})" if kind else provider
        if to is CircuitState.OPEN:
            log.warning("circuit for %s opened for every router", what)
        else:
            log.info("circuit for %s closed again for every router", what)

    # ---- Redis calls and fallback -------------------------------------------------------

    def _ready(self) -> bool:
        return self.active or time.monotonic() >= self._retry_at

    async def _call(self, script: str, target: str, args: list[Any]) -> Any:
        if not self._ready():
            return None
        key = target_key(self._prefix, target)
        try:
            reply = await asyncio.wait_for(self._pipeline([(script, key, args)]), self._timeout)
        except _FAILURES as exc:  # local state until it answers
            self._failed(exc)
            return None
        self._succeeded()
        return reply

    @property
    def routers_key(self) -> str:
        """The sorted set of routers heard from, scored by when."""
        return f"{self._prefix}:routers"

    async def _pipeline(self, calls: list[tuple[str, str, list[Any]]]) -> list[Any]:
        """EVALSHA each ``(script, key, args)`` in one round trip (loading the scripts
        first when Redis lost them: a restart, or SCRIPT FLUSH)."""
        try:
            return await self._execute(calls)
        except NoScriptError:
            for name, text in self._scripts.items():
                self._sha[name] = await self._redis.script_load(text)
            return await self._execute(calls)

    async def _execute(self, calls: list[tuple[str, str, list[Any]]]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for script, key, args in calls:
            pipe.evalsha(self._sha[script], 1, key, *args)
        replies: list[Any] = await pipe.execute()
        return replies

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self._retry_at = time.monotonic() + RETRY_SECONDS
        if self.active:
            self.active = False
            log.warning(
                "shared circuit and outage state: Redis did not answer (%s); this router"
                " routes on its own circuits and outage clock until it does",
                type(exc).__name__,
            )

    def _succeeded(self) -> None:
        if not self.active:
            self.active = True
            log.info("shared circuit and outage state: Redis answers again")


def _pairs(values: list[int]) -> Iterable[tuple[int, int]]:
    return zip(values[0::2], values[1::2], strict=True)


def shared_state(
    settings: RouterSettings,
    redis: Any,
    providers: Sequence[ProviderConfig],
    outages: OutageClock,
) -> SharedState:
    """The shared state of the enabled ``providers`` and the sender, for a new router."""
    return SharedState(
        redis,
        settings.redis_prefix,
        {p.name: p.intents for p in providers if p.enabled},
        [SENDER_TARGET],
        settings.circuit(),
        probe_interval=settings.outage_probe_seconds,
        hold_max=settings.outage_hold_max_seconds,
        router_id=uuid.uuid4().hex[:12],
        outages=outages,
    )
