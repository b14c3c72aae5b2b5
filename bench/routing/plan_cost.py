"""``python -m bench.routing.plan_cost``: the router's CPU per leased intent for routing, the
policy against the seed's cheapest-first, in this process.

Both route the same 500-intent leases (the router's lease size; 20 % transactional, 20 %
digest, 60 % marketing, deadlines an hour out), either far enough apart in time that the
providers keep up or so close together that every intent spills. The policy
path is the real :func:`sluice.router.routing.plan_routes`; the baseline is cheapest-first
as the seed did it (one choice per kind, then the same grouping). Median of 3 runs of
``--leases`` leases each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sluice.common.model import PRIORITY
from sluice.common.providers import DEFAULT_PROVIDERS
from sluice.router.repository import LeasedIntent
from sluice.router.routing import MAX_MESSAGES_PER_SEND_BATCH, ProviderChooser, plan_routes

LEASE = 500


def _lease(now: datetime) -> list[LeasedIntent]:
    kinds = ("transactional", "digest", "marketing", "marketing", "marketing")
    return [
        LeasedIntent(
            id=uuid.uuid4(),
            recipient=f"user{n}@example.com",
            kind=kinds[n % 5],
            template_id=f"t{n % 3}",
            variables={},
            deadline=now + timedelta(hours=1),
            attempts=0,
            idempotency_key=str(n),
            traceparent=None,
            campaign_id="c",
        )
        for n in range(LEASE)
    ]


def _seed_plan(intents: Sequence[LeasedIntent], now: datetime) -> int:
    """Cheapest-first, the seed's way: one provider per kind, grouped per template."""
    ordered = sorted(DEFAULT_PROVIDERS, key=lambda p: (p.cost_per_thousand, p.name))
    choice = {k: next((p for p in ordered if k in p.intents), None) for k in PRIORITY}
    groups: dict[tuple[str, str], list[LeasedIntent]] = {}
    for i in sorted(intents, key=lambda i: PRIORITY[i.kind]):
        provider = choice[i.kind]
        if i.deadline > now and provider is not None:
            groups.setdefault((provider.name, i.template_id), []).append(i)
    return sum(1 for g in groups.values() for _ in range(0, len(g), MAX_MESSAGES_PER_SEND_BATCH))


def _time(leases: int, policy: bool, step: float) -> float:
    """Microseconds per intent, leases ``step`` seconds apart."""
    now = datetime(2030, 1, 1, tzinfo=UTC)
    batches = [_lease(now + timedelta(seconds=n * step)) for n in range(leases)]
    chooser = ProviderChooser(DEFAULT_PROVIDERS)
    started = time.process_time()  # CPU time: the machine is shared
    for n, lease in enumerate(batches):
        at = now + timedelta(seconds=n * step)
        if policy:
            plan_routes(lease, chooser, now=at)
        else:
            _seed_plan(lease, at)
    return (time.process_time() - started) * 1e6 / (leases * LEASE)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints µs per intent for both, median of 3, and their ratio."""
    parser = argparse.ArgumentParser(prog="python -m bench.routing.plan_cost")
    parser.add_argument("--leases", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"routing CPU per intent, {args.leases} leases of {LEASE}, median of 3")
    # 40 s apart the providers keep up (ses drains 560 a lease); 1 s apart they fall behind,
    # every cheaper provider is full and every intent spills (the costly path).
    for label, step in (("providers keep up", 40.0), ("every intent spills", 1.0)):
        seed = statistics.median(_time(args.leases, False, step) for _ in range(3))
        ours = statistics.median(_time(args.leases, True, step) for _ in range(3))
        print(f"  {label}:")
        print(f"    cheapest-first (seed): {seed:6.2f} µs")
        print(f"    policy (plan_routes):  {ours:6.2f} µs  ({ours / seed:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
