"""``python -m bench.routing``: every scenario of scenarios.toml through the simulator with
Sluice's policy, the seed's cheapest-first and round-robin, against the offline optimum."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.routing.optimum import optimum
from bench.routing.scenario import SCENARIOS_FILE, load_scenarios
from bench.routing.sim import Outcome, simulate

STRATEGIES = ("sluice", "cheapest-first", "round-robin")


def _misses(o: Outcome) -> str:
    parts = [f"{k} {n}" for k, n in sorted(o.misses.items()) if n]
    return ", ".join(parts) or "0"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the scenarios and prints one table per scenario; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__)
    parser.add_argument("--scenarios", type=Path, default=SCENARIOS_FILE)
    parser.add_argument("--only", default="", help="run scenarios whose name contains this")
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 110))
    status = 0
    for scenario in load_scenarios(args.scenarios):
        if args.only not in scenario.name:
            continue
        started = time.perf_counter()
        best = optimum(scenario)
        table = Table(title=f"{scenario.name} ({len(scenario.arrivals):,} intents)")
        for column in (
            "strategy",
            "cost $",
            "$ per 1,000",
            "vs optimum",
            "deadline misses",
            "tx p95 s",
            "lost",
            "sent per provider",
        ):
            table.add_column(column, justify="left" if column[0] in "sd" else "right")
        table.add_row(
            "optimum (offline)",
            f"{best.cost:.3f}",
            f"{best.per_thousand:.4f}",
            "1.000",
            str(best.misses),
            "-",
            "-",
            "-",
        )
        for name in STRATEGIES:
            o = simulate(scenario, name)
            if o.lost or o.duplicates:
                status = 1
            table.add_row(
                name,
                f"{o.cost:.3f}",
                f"{o.per_thousand:.4f}",
                f"{o.cost / best.cost:.3f}" if best.cost else "-",
                _misses(o),
                f"{o.tx_p95:.1f}",
                str(o.lost + o.duplicates),
                ", ".join(f"{p} {n}" for p, n in sorted(o.by_provider.items())),
            )
        console.print(table)
        console.print(f"  simulated in {time.perf_counter() - started:.1f} s", highlight=False)
    return status


if __name__ == "__main__":
    sys.exit(main())
