"""The routing policy: which provider sends each intent, and why. Pure: no I/O, no clock.

:func:`decide` takes a batch of intents (:class:`Demand`), the state of every configured
provider (:class:`ProviderState`) and the work already planned for each (:class:`PlanState`),
and answers one :class:`Decision` per intent, plus the plan with this batch added:

* ``ROUTE``: send it through ``provider`` (its ``cost`` in US dollars and a ``reason``);
* ``WAIT``: no provider can take it now, but a configured one could later (disabled,
  unverified, circuit open, quota spent), or waiting for a cheaper provider that comes back
  soon still meets the deadline: it stays pending until ``retry_at``;
* ``NEVER``: no configured provider serves its kind (or SMTPUTF8 when it needs it).

Choice. Candidates are the providers that are enabled, verified, serve the kind (and
SMTPUTF8 when the address needs it), whose circuit is closed, that are not ``closed`` to the
kind (its circuit for that kind is open, or it is unreachable: other kinds still use it) and
whose daily quota is not spent. Cheapest first (ties by name), an intent goes to the first
candidate whose planned finish meets its deadline less ``margin_seconds``: the finish is
when the work already planned for that provider, sent at its burst and then its sustained
rate, leaves room for this one. So mail spills to a dearer provider only when the cheaper
ones would make it miss its deadline. When no candidate can meet it, it goes to the one that
finishes first.

Headroom. A provider that is the only candidate for ``reserved_kind`` (transactional mail)
keeps ``reserve`` of its sustained rate and daily quota for that kind: other kinds are
planned there at ``(1 - reserve)`` of its rate in a lane of their own, and may use at most
``(1 - reserve)`` of its quota, so a marketing flood cannot take the capacity password
resets need. Reserved-kind intents are planned in a separate lane at the full rate: they
lease before other kinds, so nothing planned in the shared lane delays them.

Share. A router plans with ``share`` of each provider's rate and burst: R routers each
plan their own leases, so each plans with 1/R of the capacity and together they never plan
more than the provider sends (nor eat into the reserve), however the work is split.

Reasons. A decision's reason names the rule that chose the provider and, when cheaper
providers serving the kind were passed over (circuit open, closed to the kind, degraded,
quota spent), which and why: what GetIntent shows.

Plan. :class:`PlanState` holds, per lane, a backlog in messages as of a time; a backlog
drains at the lane's rate while the provider's circuit is closed (a provider that is down
sends nothing). It is a small immutable value the caller keeps between batches, and can
store and load (for example in Redis, to share one plan between routers).

An intent that was planned for a provider before (``planned_provider``: a throttled intent,
or one that waited for its slot) claims its slot again: it is not counted twice. When it
goes elsewhere instead, its slot is given back.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from sluice.common.providers import ProviderConfig

__all__ = [
    "Decision",
    "Demand",
    "PlanState",
    "PolicyConfig",
    "ProviderState",
    "Verdict",
    "decide",
    "provider_state",
]

PRIORITY = {"transactional": 0, "digest": 1, "marketing": 2}
RESERVED_LANE = "!reserved"  # suffix of a reserved kind's lane key; no provider name has "!"


class Verdict(enum.Enum):
    """What happens to an intent now."""

    ROUTE = "route"
    WAIT = "wait"
    NEVER = "never"


class Demand(NamedTuple):
    """One intent as the policy sees it. Times are seconds since the epoch.

    ``campaign`` does not change the choice (fair shares between campaigns are the lease's
    job); it is carried so callers can group decisions. (A named tuple, not a dataclass:
    the router builds one per leased intent, and this is the cheapest immutable record.)
    """

    kind: str
    deadline: float
    due: float = 0.0
    needs_smtputf8: bool = False
    campaign: str = ""
    planned_provider: str | None = None


@dataclass(frozen=True, slots=True)
class ProviderState:
    """One configured provider, and what is true of it right now.

    ``sustained_rate`` is messages per second (0 with ``burst`` 0: unlimited); ``daily_quota``
    0 means none. ``available_at`` is when an unusable provider is expected back (the end of
    its circuit's cool-down), or None when unknown.
    """

    name: str
    cost_per_thousand: float
    sustained_rate: float
    burst: int
    intents: frozenset[str]
    enabled: bool = True
    verified: bool = True
    smtputf8: bool = True
    daily_quota: int = 0
    quota_used: int = 0
    circuit_open: bool = False
    degraded: bool = False
    available_at: float | None = None
    #: kinds it must not take now, and why ("circuit open", "unreachable")
    closed: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: the part of its rate and burst this router plans with (see the module docstring)
    share: float = 1.0

    @property
    def rate(self) -> float:
        """Messages per second it sustains (``inf`` when unlimited)."""
        if self.sustained_rate > 0:
            return self.sustained_rate
        return float(self.burst) if self.burst > 0 else math.inf

    def serves(self, kind: str, needs_smtputf8: bool) -> bool:
        """True when it could ever take such an intent (whatever its state now)."""
        return kind in self.intents and (self.smtputf8 or not needs_smtputf8)


def provider_state(
    config: ProviderConfig,
    *,
    quota_used: int = 0,
    circuit_open: bool = False,
    degraded: bool = False,
    available_at: float | None = None,
    closed: Mapping[str, str] | None = None,
    share: float = 1.0,
) -> ProviderState:
    """A :class:`ProviderState` from a :class:`sluice.common.providers.ProviderConfig` and
    what is true of the provider now."""
    return ProviderState(
        name=config.name,
        cost_per_thousand=config.cost_per_thousand,
        sustained_rate=config.sustained_rate,
        burst=config.burst,
        intents=config.intents,
        enabled=config.enabled,
        verified=config.verified,
        smtputf8=config.smtputf8,
        daily_quota=config.daily_quota,
        quota_used=quota_used,
        circuit_open=circuit_open,
        degraded=degraded,
        available_at=available_at,
        closed=MappingProxyType(dict(closed)) if closed else MappingProxyType({}),
        share=share,
    )


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Tuning of the policy; the defaults are what the router uses."""

    margin_seconds: float = 1.0
    reserve: float = 0.15
    reserved_kind: str = "transactional"
    wait_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.reserve < 1.0:
            raise ValueError("reserve must be in [0, 1)")
        if self.margin_seconds < 0 or self.wait_seconds <= 0:
            raise ValueError("margin_seconds must be >= 0 and wait_seconds > 0")


@dataclass(frozen=True, slots=True)
class PlanState:
    """Work planned per lane: lane key -> (backlog in messages, as of this time).

    A lane key is a provider name, or ``name + "!reserved"`` for a provider's reserved lane.
    """

    lanes: Mapping[str, tuple[float, float]] = field(default_factory=lambda: MappingProxyType({}))

    def backlog(self, lane: str, now: float, rate: float) -> float:
        """Messages still planned for ``lane`` at ``now``, draining at ``rate``."""
        backlog, as_of = self.lanes.get(lane, (0.0, now))
        return max(0.0, backlog - rate * max(0.0, now - as_of))

    def seconds_ahead(self, provider: str, now: float, rate: float) -> float:
        """How long the work planned for a provider's shared lane takes at ``rate``."""
        if math.isinf(rate) or rate <= 0:
            return 0.0
        return self.backlog(provider, now, rate) / rate


class Decision(NamedTuple):
    """What to do with one intent (a named tuple: one is made per intent)."""

    verdict: Verdict
    reason: str
    provider: str | None = None
    cost: float = 0.0
    finish: float = 0.0
    retry_at: float = 0.0


@dataclass(slots=True)
class _Lane:
    key: str
    provider: ProviderState
    rate: float  # effective messages/s for this lane (inf: unlimited)
    backlog: float
    quota_left: float  # messages this lane may still take today (inf: no quota)
    credit: float  # the burst: messages that go at once when the lane is idle

    def finish(self, now: float, due: float, extra: float = 1.0) -> float:
        """When message number ``backlog + extra`` of this lane goes out: the first
        ``credit`` at once (a full bucket), the rest at the lane's rate. Once a lane has
        been busy its backlog still counts the burst it spent, so this stays right while
        the backlog drains."""
        if math.isinf(self.rate):
            return max(now, due)
        return max(now + max(0.0, self.backlog + extra - self.credit) / self.rate, due)


def _why_not(p: ProviderState, quota_spent: bool) -> str | None:
    if not p.enabled:
        return "disabled"
    if not p.verified:
        return "sending domain not verified"
    if p.circuit_open:
        return "circuit open"
    if quota_spent:
        return "daily quota spent"
    return None


class _Planner:
    """The per-call working state of :func:`decide`."""

    def __init__(
        self,
        providers: Sequence[ProviderState],
        plan: PlanState,
        now: float,
        config: PolicyConfig,
    ) -> None:
        self.now = now
        self.config = config
        self.plan = plan
        self.providers = sorted(providers, key=lambda p: (p.cost_per_thousand, p.name))
        self.by_name = {p.name: p for p in self.providers}
        self.unusable: dict[str, str] = {}
        for p in self.providers:
            quota_spent = p.daily_quota > 0 and p.quota_used >= p.daily_quota
            reason = _why_not(p, quota_spent)
            if reason is not None:
                self.unusable[p.name] = reason
        usable = [p for p in self.providers if p.name not in self.unusable]
        # Degraded providers are a last resort: used only for kinds no healthy one serves.
        self.usable = [p for p in usable if not p.degraded] + [p for p in usable if p.degraded]
        reserved_paths = [p for p in usable if config.reserved_kind in p.intents]
        self.reserved = (
            reserved_paths[0].name if len(reserved_paths) == 1 and config.reserve > 0 else None
        )
        self.lanes: dict[str, _Lane] = {}
        self.candidates: dict[tuple[str, bool], list[_Lane]] = {}
        # per (kind, SMTPUTF8): the providers serving it that are not candidates now, and why
        self.passed: dict[tuple[str, bool], list[tuple[ProviderState, str]]] = {}
        self.reasons: dict[tuple[str, str, str, bool], str] = {}
        # Waiting for a cheaper provider needs one whose circuit is open and that says when.
        self.waitable = any(
            p.circuit_open and p.available_at is not None and p.available_at > now
            for p in self.providers
        )

    def lane(self, p: ProviderState, kind: str) -> _Lane:
        reserved = p.name == self.reserved
        own = reserved and kind == self.config.reserved_kind
        key = p.name + RESERVED_LANE if own else p.name
        lane = self.lanes.get(key)
        if lane is None:
            share = (1.0 - self.config.reserve if reserved and not own else 1.0) * p.share
            rate = p.rate * share
            drain = 0.0 if p.circuit_open else rate
            quota = math.inf
            if p.daily_quota > 0:
                quota = p.daily_quota * (1.0 if own or not reserved else share) - p.quota_used
            backlog = 0.0 if math.isinf(rate) else self.plan.backlog(key, self.now, drain)
            lane = self.lanes[key] = _Lane(key, p, rate, backlog, quota, p.burst * share)
        return lane

    def lanes_for(self, kind: str, needs_smtputf8: bool) -> list[_Lane]:
        found = self.candidates.get((kind, needs_smtputf8))
        if found is None:
            healthy = [
                p for p in self.usable if p.serves(kind, needs_smtputf8) and kind not in p.closed
            ]
            if any(not p.degraded for p in healthy):
                healthy = [p for p in healthy if not p.degraded]
            found = self.candidates[(kind, needs_smtputf8)] = [self.lane(p, kind) for p in healthy]
            chosen = {p.name for p in healthy}
            self.passed[(kind, needs_smtputf8)] = [
                (p, why)
                for p in self.providers
                if p.name not in chosen
                and p.serves(kind, needs_smtputf8)
                and (why := self._passed_why(p, kind)) is not None
            ]
        return found

    def _passed_why(self, p: ProviderState, kind: str) -> str | None:
        """Why a provider serving ``kind`` is not a candidate, when that is worth telling
        (disabled and unverified ones are configuration, not news)."""
        why = self.unusable.get(p.name)
        if why in ("circuit open", "daily quota spent"):
            return why
        if why is not None:
            return None
        closed = p.closed.get(kind)
        if closed is not None:
            return f"{closed} for {kind}"
        return "degraded" if p.degraded else None

    def state(self) -> PlanState:
        lanes = dict(self.plan.lanes)
        for key, (backlog, _) in self.plan.lanes.items():
            p = self.by_name.get(key.partition("!")[0])
            if p is not None and p.circuit_open:
                # A provider that is down sends nothing: its planned work does not drain.
                lanes[key] = (backlog, self.now)
        for key, lane in self.lanes.items():
            if lane.backlog > 0 and not math.isinf(lane.rate):
                lanes[key] = (lane.backlog, self.now)
            else:
                lanes.pop(key, None)  # an empty lane needs no entry: the plan stays small
        return PlanState(MappingProxyType(lanes))

    def decide(self, d: Demand) -> Decision:
        lanes = self.lanes_for(d.kind, d.needs_smtputf8)
        now = self.now
        latest = d.deadline - self.config.margin_seconds
        planned = self.by_name.get(d.planned_provider) if d.planned_provider else None
        if planned is not None:
            if now <= latest:
                for lane in lanes:
                    if lane.provider is planned and lane.quota_left >= 1:
                        # Its slot is somewhere in that backlog, planned to meet the deadline
                        # when it was given: keep it (counted once, when it was planned).
                        return self._take(lane, now, "its planned slot", d, count=False)
            # It gives up that slot: the work planned there shrinks, and it is planned anew.
            lane = self.lane(planned, d.kind)
            lane.backlog = max(0.0, lane.backlog - 1.0)
        chosen: _Lane | None = None
        finish = math.inf
        late: list[tuple[_Lane, float]] = []
        for lane in lanes:
            if lane.quota_left < 1:
                continue
            f = lane.finish(now, d.due)
            if f <= latest:
                chosen, finish = lane, f
                break
            late.append((lane, f))
        if chosen is None:
            if not late:
                return self._no_candidate(d)
            chosen, finish = min(late, key=lambda lf: lf[1])
            return self._take(
                chosen,
                finish,
                f"no provider meets the deadline; {chosen.provider.name} finishes first",
                d,
            )
        if self.waitable:
            waited = self._wait_for_cheaper(d, chosen, latest)
            if waited is not None:
                return waited
        if not late:
            return self._take(chosen, finish, "cheapest that meets the deadline", d)
        # Formatted only for the intents that spill: the common case stays cheap.
        margin = self.config.margin_seconds
        why = "; ".join(
            f"{lane.provider.name} would take {f - now:.0f} s, "
            f"deadline in {d.deadline - now:.0f} s less {margin:g} s"
            for lane, f in late
        )
        return self._take(chosen, finish, "spilled: " + why, d)

    def _take(
        self, lane: _Lane, finish: float, reason: str, d: Demand, *, count: bool = True
    ) -> Decision:
        if count:
            lane.backlog += 1.0
        lane.quota_left -= 1.0
        p = lane.provider
        key = (p.name, reason, d.kind, d.needs_smtputf8)
        text = self.reasons.get(key)
        if text is None:
            text = self.reasons[key] = f"{p.name}: {reason}" + self._passed_note(p, d)
        return Decision(Verdict.ROUTE, text, p.name, p.cost_per_thousand / 1000.0, finish)

    def _passed_note(self, chosen: ProviderState, d: Demand) -> str:
        """ " (passed over: ses circuit open, ...)" for the cheaper providers that were not
        candidates, or "" when none was."""
        rank = (chosen.cost_per_thousand, chosen.name)
        cheaper = [
            f"{p.name} {why}"
            for p, why in self.passed.get((d.kind, d.needs_smtputf8), ())
            if (p.cost_per_thousand, p.name) < rank
        ]
        return f" (passed over: {', '.join(cheaper)})" if cheaper else ""

    def _wait_for_cheaper(self, d: Demand, chosen: _Lane, latest: float) -> Decision | None:
        """WAIT for a cheaper provider that comes back soon, when waiting still meets the
        deadline with it and leaves ``chosen`` able to meet it too if it does not."""
        for p in self.providers:
            if p.cost_per_thousand >= chosen.provider.cost_per_thousand:
                return None
            back = p.available_at
            if (
                back is None
                or back <= self.now
                or self.unusable.get(p.name) != "circuit open"
                or not p.serves(d.kind, d.needs_smtputf8)
            ):
                continue
            lane = self.lane(p, d.kind)
            if lane.quota_left < 1:
                continue
            if lane.finish(back, d.due) <= latest and chosen.finish(back, d.due) <= latest:
                lane.backlog += 1.0
                lane.quota_left -= 1.0
                return Decision(
                    Verdict.WAIT,
                    f"waiting for {p.name} (circuit open, back in {back - self.now:.0f} s): "
                    f"cheaper than {chosen.provider.name} and still in time",
                    provider=p.name,
                    retry_at=back,
                )
        return None

    def _why_not_now(self, p: ProviderState, kind: str) -> str:
        why = self.unusable.get(p.name)
        if why is not None:
            return why
        closed = p.closed.get(kind)
        # a usable provider serving the kind that is no candidate has its lane's quota spent
        return f"{closed} for {kind}" if closed is not None else "daily quota spent"

    def _no_candidate(self, d: Demand) -> Decision:
        could = [p for p in self.providers if p.serves(d.kind, d.needs_smtputf8)]
        what = f"intent {d.kind}" + (" with an SMTPUTF8 address" if d.needs_smtputf8 else "")
        if not could:
            return Decision(Verdict.NEVER, f"no configured provider supports {what}")
        why = ", ".join(f"{p.name} {self._why_not_now(p, d.kind)}" for p in could)
        backs = [
            p.available_at
            for p in could
            if p.available_at is not None and p.available_at > self.now
        ]
        retry_at = min([self.now + self.config.wait_seconds, *backs])
        return Decision(Verdict.WAIT, f"no provider can take {what} now: {why}", retry_at=retry_at)


def decide(
    demands: Sequence[Demand],
    providers: Iterable[ProviderState],
    plan: PlanState,
    *,
    now: float,
    config: PolicyConfig = PolicyConfig(),
) -> tuple[list[Decision], PlanState]:
    """One decision per demand (in input order) and the plan with this batch added.

    The batch is planned most urgent first (kind priority, then deadline), so tight
    deadlines get the cheap early slots and loose ones take what is left.
    """
    planner = _Planner(list(providers), plan, now, config)
    order = sorted(
        range(len(demands)),
        key=lambda i: (PRIORITY.get(demands[i].kind, len(PRIORITY)), demands[i].deadline),
    )
    decisions: list[Decision | None] = [None] * len(demands)
    for i in order:
        decisions[i] = planner.decide(demands[i])
    return [d for d in decisions if d is not None], planner.state()
