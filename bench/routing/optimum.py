"""The least cost that meets every deadline, offline, as a min-cost flow.

Time is cut at every instant where something changes (an arrival, a deadline, the start or
end of an outage), so within one interval every group of intents sees the same providers.
The network: source -> one node per group of intents that share (kind, arrival, deadline),
with their count as supply -> one node per (provider, interval) the group may use (the
provider serves the kind, is not failing, and the interval lies between arrival and
deadline) -> sink, with capacity sustained rate x interval length, at the provider's price.
A "miss" edge from each group straight to the sink at a prohibitive price keeps the flow
feasible and counts the intents no schedule could send in time.

The optimum knows the future (arrivals and outages) and treats capacity as a fluid at the
sustained rate plus the full bucket (the burst) at the start: a bound for an online router
to be measured against, not a schedule one could run.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from dataclasses import dataclass

import networkx as nx  # type: ignore[import-untyped]  # bench-only, ships no stubs

from bench.routing.scenario import Scenario

MICRO = 1_000_000  # costs in millionths of a dollar: network simplex wants integers
MISS_COST = 10**9


@dataclass(frozen=True)
class Optimum:
    """The least cost (US dollars) and the intents no schedule could send in time."""

    cost: float
    misses: int
    sent: int

    @property
    def per_thousand(self) -> float:
        """US dollars per 1,000 sent."""
        return self.cost * 1000 / self.sent if self.sent else 0.0


def optimum(scenario: Scenario) -> Optimum:
    """Solves the scenario's min-cost flow."""
    groups = Counter((a.kind, a.at, a.deadline) for a in scenario.arrivals)
    cuts = sorted(
        {t for _, at, dl in groups for t in (at, dl)}
        | {t for o in scenario.outages for t in (o.start, o.end)}
    )
    intervals = list(itertools.pairwise(cuts))
    graph = nx.DiGraph()
    total = sum(groups.values())
    graph.add_node("source", demand=-total)
    graph.add_node("sink", demand=total)
    for p in scenario.providers:
        for n, (a, b) in enumerate(intervals):
            if scenario.failing(p.name, a):
                continue
            capacity = math.floor(p.sustained_rate * (b - a) + 1e-9)
            if a == 0:
                capacity += p.burst  # the bucket starts full
            if capacity > 0:
                graph.add_edge(
                    (p.name, n),
                    "sink",
                    capacity=capacity,
                    weight=round(p.cost_per_thousand * MICRO / 1000),
                )
    for g, count in groups.items():
        kind, at, deadline = g
        graph.add_edge("source", g, capacity=count, weight=0)
        graph.add_edge(g, "sink", capacity=count, weight=MISS_COST)
        for p in scenario.providers:
            if kind not in p.intents:
                continue
            # Intervals are cut at every arrival and deadline: [at, deadline) is a run of them.
            first, last = bisect.bisect_left(cuts, at), bisect.bisect_left(cuts, deadline)
            for n in range(first, last):
                if graph.has_edge((p.name, n), "sink"):
                    graph.add_edge(g, (p.name, n), capacity=count, weight=0)
    flow = nx.min_cost_flow(graph)
    misses = sum(flow[g]["sink"] for g in groups)
    cost = sum(
        f * graph.edges[node, "sink"]["weight"]
        for node, out in flow.items()
        if isinstance(node, tuple) and len(node) == 2
        for target, f in out.items()
        if target == "sink"
    )
    return Optimum(cost=cost / MICRO, misses=misses, sent=total - misses)
