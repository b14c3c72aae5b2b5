"""``sluice status`` against a running local stack: the real console script for the plain
snapshot (``--once``), and the live view in process on a terminal-like console."""

from __future__ import annotations

import asyncio
import io
import re
import time
import uuid
from pathlib import Path

import asyncpg
import grpc
from rich.console import Console

from sluice.cli.demo_campaign import campaign_items
from sluice.cli.dev import LocalStack, local_stack
from sluice.cli.embedded import find_free_port
from sluice.cli.stack_settings import StackSettings
from sluice.cli.status import take_snapshot, watch
from sluice.common.auth import bearer
from sluice.common.providers import DEFAULT_PROVIDERS
from sluice.v1 import ingest_pb2, ingest_pb2_grpc
from tests.cli.test_cli import REDIS_URL, sluice

WAIT_SECONDS = 60.0


async def submit(stack: LocalStack, campaign: str, count: int) -> None:
    async with grpc.aio.insecure_channel(stack.ingest) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        await stub.SubmitIntents(
            ingest_pb2.SubmitIntentsRequest(intents=campaign_items(campaign, count)),
            timeout=30,
            metadata=bearer(stack.token),
        )


async def settle(pg_dsn: str) -> dict[str, int]:
    """Waits until nothing is pending or leased; returns the counts by status."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            rows = await conn.fetch(
                "SELECT status::text AS s, count(*) AS n FROM intents GROUP BY 1"
            )
            counts = {r["s"]: r["n"] for r in rows}
            if not counts.get("pending") and not counts.get("leased"):
                return counts
            assert time.monotonic() < deadline, counts
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


def settings(pg_dsn: str, redis_prefix: str) -> StackSettings:
    return StackSettings.of(
        database_url=pg_dsn,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        shutdown_grace_seconds=2,
    )


async def test_once_prints_the_queue_providers_headroom_and_cost(
    pg_dsn: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with local_stack(
        settings(pg_dsn, redis_prefix), state_dir=tmp_path, any_ports=True
    ) as stack:
        await submit(stack, f"status-{uuid.uuid4().hex[:8]}", 40)
        counts = await settle(pg_dsn)
        code, out, err = await sluice(
            "status",
            "--once",
            "--router",
            stack.router,
            "--sender",
            stack.sender,
            wait=60,
            SLUICE_TOKEN=stack.token,
        )
        snapshot = await take_snapshot(stack.router, stack.sender, token=stack.token)
    assert code == 0, out + err
    assert counts["sent"] >= 30
    # The queue: one row per status, with the database's numbers.
    for status, n in counts.items():
        assert re.search(rf"^\s*{status}\b.*\b{n}\s*$", out, re.MULTILINE), (status, n, out)
    # Every provider, with its health, price and the sender's headroom.
    for provider in DEFAULT_PROVIDERS:
        (line,) = [ln for ln in out.splitlines() if ln.strip().startswith(provider.name + " ")]
        assert "healthy" in line or "degraded" in line, line
        assert f"{provider.cost_per_thousand:.2f}" in line, line
        assert f"/{provider.burst}" in line, line  # burst window left, from GetCapacity
        assert f"(+{provider.sustained_rate:g}/s)" in line, line  # sustained tokens
    spent = sum(p.spent for p in snapshot.providers)
    assert f"sent {counts['sent']:,}, ${spent:.4f} in all" in out
    assert sum(p.sent for p in snapshot.providers) == counts["sent"]
    assert not snapshot.problems


async def test_a_missing_sender_is_shown_and_a_missing_router_fails(
    pg_dsn: str, redis_prefix: str, tmp_path: Path
) -> None:
    nowhere = f"127.0.0.1:{find_free_port()}"
    async with local_stack(
        settings(pg_dsn, redis_prefix), state_dir=tmp_path, any_ports=True
    ) as stack:
        code, out, err = await sluice(
            "status",
            "--once",
            "--router",
            stack.router,
            "--sender",
            nowhere,
            SLUICE_TOKEN=stack.token,
        )
        assert code == 0, out + err
        assert f"sender {nowhere}: UNAVAILABLE" in out
        # Without the token the router refuses, and the command says so.
        code, out, err = await sluice("status", "--once", "--router", stack.router)
        assert code == 1, out + err
        assert f"router {stack.router} did not answer: UNAUTHENTICATED" in err
    code, out, err = await sluice("status", "--once", "--router", nowhere, "--sender", nowhere)
    assert code == 1
    assert f"sluice status: router {nowhere} did not answer: UNAVAILABLE" in err
    assert "Traceback" not in err


async def test_live_view_redraws_in_place_with_throughput(
    pg_dsn: str, redis_prefix: str, tmp_path: Path
) -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160, color_system=None)
    async with local_stack(
        settings(pg_dsn, redis_prefix), state_dir=tmp_path, any_ports=True
    ) as stack:
        await submit(stack, f"live-{uuid.uuid4().hex[:8]}", 60)
        code = await watch(
            stack.router, stack.sender, interval=1.0, console=console, token=stack.token, rounds=3
        )
    assert code == 0
    text = screen.getvalue()
    # Redrawn in place: the cursor moves back up over the previous frame.
    assert text.count("providers") >= 3  # one frame per refresh (rich redraws once more on exit)
    assert re.search(r"\x1b\[\d*A", text), "no cursor-up: frames were appended, not redrawn"
    # From the second frame on, sent/s is a number (the change between two snapshots).
    last = text.rsplit("providers", 1)[1]
    rates = re.findall(r"\b\d+\.\d+\s+\d+\.\d+\s*$", last, re.MULTILINE)
    assert rates, last
