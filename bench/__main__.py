"""``python -m bench``: run the benchmarks and print a table (see bench/e2e.py for method).

Uses DATABASE_URL / REDIS_URL when set (each run creates and drops its own database), else
embedded throwaway servers. Saves the figures as JSON under bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.e2e import Measurements, measure, median

LEGEND = """\
  end to end: ingest → PostgreSQL → router → SendBatch → sender → unlimited sandbox → result
              written back; timed from the router's first lease until every intent is 'sent'
  2 routers: another batch queued with the router stopped, then two router processes drain it
  steady: both routers running while ingest takes another batch; timed from the first
              submission until the last of that batch is sent
  metrics off: the same run with SLUICE_METRICS_PORT=-1 (nothing recorded or served);
              metrics cost = 1 - on/off (each run does both, back to back)
  ingest: SubmitIntents over gRPC, 1,000 per batch, 4 batches in flight, into an empty queue
  unary: 5,000 SubmitIntent calls, 64 in flight from one client process (its CPU counts)
  bare pipeline: the router's lease → complete SQL in this process, no gRPC, sender or Redis
              (router batch size and concurrency); bare insert: ingest's insert_intents
  CPU s during send: each service with its child processes (the sender's render workers),
              and the PostgreSQL backends of the run's database, per email sent
  services run as separate processes (sluice serve ...), as they do in production"""

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_table(results: Measurements, count: int, runs: int) -> Table:
    """stage | unit | median | min | max | ratio vs baseline."""
    table = Table(title=f"Sluice bench: {count:,} intents, median of {runs} run(s)")
    for name, justify in (
        ("stage", "left"),
        ("unit", "left"),
        ("median", "right"),
        ("min", "right"),
        ("max", "right"),
        ("ratio vs baseline", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]

    pipeline_base = median(results.baseline_pipeline)
    insert_base = median(results.baseline_insert)
    rows = (
        (
            "end to end (trio)",
            "emails/s",
            results.e2e,
            f"{median(results.e2e) / pipeline_base:.2f}x bare pipeline",
        ),
        (
            "end to end, 2 routers",
            "emails/s",
            results.e2e_two_routers,
            f"{median(results.e2e_two_routers) / pipeline_base:.2f}x bare pipeline",
        ),
        (
            "steady: ingest while sending",
            "emails/s",
            results.steady,
            f"{median(results.steady) / pipeline_base:.2f}x bare pipeline",
        ),
        (
            "end to end, metrics off",
            "emails/s",
            results.e2e_metrics_off,
            f"metrics cost {1 - median(results.e2e) / median(results.e2e_metrics_off):+.1%}",
        ),
        (
            "ingest SubmitIntents",
            "intents/s",
            results.ingest,
            f"{median(results.ingest) / insert_base:.2f}x bare insert",
        ),
        (
            "ingest SubmitIntent, unary",
            "requests/s",
            results.unary,
            f"{median(results.unary) / median(results.ingest):.2f}x SubmitIntents",
        ),
        ("bare pipeline (baseline)", "emails/s", results.baseline_pipeline, "1.00x"),
        ("bare insert (baseline)", "intents/s", results.baseline_insert, "1.00x"),
    )
    for stage, unit, values, ratio in rows:
        table.add_row(
            stage,
            unit,
            f"{median(values):,.0f}",
            f"{min(values):,.0f}",
            f"{max(values):,.0f}",
            ratio,
        )
    return table


def save(results: Measurements, count: int, runs: int, where: dict[str, str]) -> Path:
    """Writes the figures to bench/results/<timestamp>.json."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    document = {
        "count": count,
        "runs": runs,
        "cpus": os.cpu_count(),
        **where,
        "e2e_emails_per_s": results.e2e,
        "e2e_two_routers_emails_per_s": results.e2e_two_routers,
        "steady_emails_per_s": results.steady,
        "e2e_metrics_off_emails_per_s": results.e2e_metrics_off,
        "ingest_intents_per_s": results.ingest,
        "ingest_unary_requests_per_s": results.unary,
        "baseline_pipeline_per_s": results.baseline_pipeline,
        "baseline_insert_per_s": results.baseline_insert,
        "notes": results.notes,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmarks; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "End-to-end emails/s through the Sluice trio with an unlimited sandbox provider, "
            "the ingest rate, and the bare database pipeline as baseline. Uses DATABASE_URL "
            "and REDIS_URL when set, else embedded throwaway servers."
        ),
    )
    # 50,000: at 20,000 the timed window is ~2 s and the figures still include warm-up.
    parser.add_argument("--count", type=int, default=50_000, help="intents per run (50,000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per stage (3)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.runs < 1:
        parser.error("--count and --runs must be at least 1")

    results, servers = asyncio.run(measure(args.count, args.runs, _progress))
    console = Console(width=max(Console().width, 100))
    console.print(build_table(results, args.count, args.runs))
    console.print(LEGEND, highlight=False)
    for note in results.notes:
        console.print(f"  {note}", highlight=False)
    path = save(
        results,
        args.count,
        args.runs,
        {"postgres": servers.postgres_label, "redis": servers.redis_label},
    )
    console.print(f"saved {path}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
