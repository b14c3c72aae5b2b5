"""The ``sluice`` command as an operator runs it: the real console script in a subprocess,
against real PostgreSQL and Redis, and the demo against a stack running in this test."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console

from sluice.cli.demo import FAIL_RECIPIENT, campaign_items, run_demo
from sluice.cli.dev import local_stack
from sluice.cli.embedded import find_free_port
from sluice.cli.stack_settings import StackSettings
from tests.conftest import clean_env

SLUICE = str(Path(sys.executable).parent / "sluice")
REDIS_URL = os.environ.get("SLUICE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_DSN = os.environ.get(
    "SLUICE_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


async def sluice(*args: str, wait: float = 60, **env: str) -> tuple[int, str, str]:
    """Runs the ``sluice`` console script; returns (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        SLUICE,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(**env),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), wait)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _serving(target: str) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
async def empty_dsn() -> AsyncIterator[str]:
    """A brand-new database with no schema at all (not cloned from the migrated template)."""
    from urllib.parse import urlsplit, urlunsplit

    name = f"sluice_cli_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(PG_ADMIN_DSN)._replace(path=f"/{name}"))
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def test_help_names_every_command() -> None:
    code, out, _ = await sluice("--help")
    assert code == 0
    for command in ("serve", "migrate", "dev", "demo", "bench", "DATABASE_URL"):
        assert command in out
    code, out, _ = await sluice("serve", "--help")
    assert code == 0
    assert "ingest" in out
    assert "NOT_SERVING" in out
    code, out, _ = await sluice("demo", "--help")
    assert code == 0
    assert "--count" in out
    assert "--target" in out
    assert "--timeout" in out


async def test_serve_rejects_an_unknown_service() -> None:
    code, out, err = await sluice("serve", "bogus")
    assert code == 2
    assert "invalid choice: 'bogus'" in err
    assert out == ""


async def test_a_bad_setting_exits_2_with_its_name_and_no_traceback() -> None:
    code, _, err = await sluice("serve", "ingest", SLUICE_INGEST_PORT="fifty")
    assert code == 2
    assert "SLUICE_INGEST_PORT" in err
    assert "Traceback" not in err

    code, _, err = await sluice("serve", "router", SLUICE_LOG_LEVEL="LOUD")
    assert code == 2
    assert "SLUICE_LOG_LEVEL" in err
    assert "Traceback" not in err

    code, _, err = await sluice("migrate")
    assert code == 2
    assert "DATABASE_URL is not set" in err


async def test_serve_with_the_database_down_exits_3_and_says_why() -> None:
    nobody = f"postgresql://postgres@127.0.0.1:{find_free_port()}/sluice"
    code, _, err = await sluice("serve", "ingest", DATABASE_URL=nobody)
    assert code == 3  # EXIT_UNAVAILABLE
    assert "cannot start" in err
    assert "unavailable" in err.lower()
    assert "Traceback" not in err


async def test_migrate_applies_then_reports_up_to_date(empty_dsn: str) -> None:
    code, out, err = await sluice("migrate", DATABASE_URL=empty_dsn)
    assert code == 0, err
    assert "applied 0001_init" in out

    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('intents') IS NOT NULL")
    finally:
        await conn.close()

    code, out, err = await sluice("migrate", DATABASE_URL=empty_dsn)
    assert code == 0, err
    assert "up to date" in out
    assert "applied" not in out


async def test_serve_runs_until_sigterm_then_exits_0(redis_prefix: str) -> None:
    port = find_free_port()
    proc = await asyncio.create_subprocess_exec(
        SLUICE,
        "serve",
        "sender",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(
            REDIS_URL=REDIS_URL, SLUICE_REDIS_PREFIX=redis_prefix, SLUICE_SENDER_PORT=str(port)
        ),
    )
    try:
        for _ in range(200):
            if await _serving(f"127.0.0.1:{port}"):
                break
            assert proc.returncode is None, "sender exited before serving"
            await asyncio.sleep(0.05)
        else:
            pytest.fail("sluice serve sender never answered health")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    text = err.decode()
    assert f"listening on 127.0.0.1:{port}" in text
    assert "stopped" in text


async def test_dev_starts_the_trio_and_ctrl_c_stops_it(
    pg_dsn: str, redis_prefix: str, tmp_path: Path
) -> None:
    ports = {svc: find_free_port() for svc in ("INGEST", "ROUTER", "SENDER")}
    proc = await asyncio.create_subprocess_exec(
        SLUICE,
        "dev",
        "--state-dir",
        str(tmp_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(
            DATABASE_URL=pg_dsn,
            REDIS_URL=REDIS_URL,
            SLUICE_REDIS_PREFIX=redis_prefix,
            **{f"SLUICE_{svc}_PORT": str(port) for svc, port in ports.items()},
        ),
    )
    try:
        assert proc.stdout is not None
        seen = ""
        while "Ctrl-C stops everything" not in seen:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, f"sluice dev ended early: {seen}"
            seen += line.decode()
        for port in ports.values():
            assert await _serving(f"127.0.0.1:{port}")
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    banner = seen + out.decode()
    assert f"grpcurl -plaintext 127.0.0.1:{ports['INGEST']} list" in banner
    assert "stopped; nothing left running" in err.decode()
    for port in ports.values():
        assert not await _serving(f"127.0.0.1:{port}")

    conn = await asyncpg.connect(pg_dsn)
    try:
        templates = {r["id"] for r in await conn.fetch("SELECT id FROM templates")}
    finally:
        await conn.close()
    assert {"welcome", "weekly-digest", "spring-sale"} <= templates


async def test_demo_summary_adds_up_and_a_rerun_submits_nothing_new(
    pg_dsn: str, redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    from sluice.sender.providers.sandbox import SandboxLedger

    count = 40
    campaign = f"test-{uuid.uuid4().hex[:8]}"
    items = campaign_items(campaign, count)
    invalid = sum(1 for i in items if "@" not in i.recipient or "@@" in i.recipient)
    assert invalid == 2
    assert any(i.recipient == FAIL_RECIPIENT for i in items)

    settings = StackSettings.of(
        database_url=pg_dsn,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        shutdown_grace_seconds=2,
    )
    async with local_stack(settings, state_dir=tmp_path, any_ports=True) as stack:
        # The CLI, as an operator runs it: a subprocess with no TTY, so plain progress lines.
        code, out, err = await sluice(
            "demo",
            "--target",
            stack.ingest,
            "--router",
            stack.router,
            "--count",
            str(count),
            "--campaign",
            campaign,
            "--timeout",
            "40",
            SLUICE_TOKEN=stack.token,
        )
        assert code == 0, out + err
        # The sandbox fails this domain permanently; ingest must let it through to show that.
        assert f"{FAIL_RECIPIENT!r}: INVALID_ARGUMENT" not in out, (
            f"ingest rejects {FAIL_RECIPIENT}, so the demo cannot show a permanent failure"
        )
        assert f"{count - invalid} new, 0 existing, {invalid} rejected" in out
        assert "INVALID_ARGUMENT" in out
        assert "done (" in out  # the non-TTY progress lines
        assert "emails/s" in out
        assert "per 1,000" in out

        # The same campaign again, in process to read the numbers: nothing new is stored.
        printed = io.StringIO()
        result = await run_demo(
            stack.ingest,
            stack.router,
            count=count,
            campaign=campaign,
            wait_seconds=40,
            console=Console(file=printed, width=120),
            token=stack.token,
        )
        assert f"0 new, {count - invalid} existing" in printed.getvalue()

    accepted = count - invalid
    assert result.submit.created == 0
    assert result.submit.existing == accepted
    assert len(result.submit.rejected) == invalid
    assert not result.timed_out
    assert result.exit_code == 0
    statuses = result.final.by_status
    assert sum(statuses.values()) == accepted
    assert result.final.open == 0
    assert statuses["failed"] == 1  # the fail.sandbox.example address
    assert statuses["sent"] == accepted - 1
    by_provider = result.sent_by_provider()
    assert sum(by_provider.values()) == statuses["sent"]
    assert set(by_provider) <= set(result.costs)
    # Cost per 1,000 is an average of the costs of the providers used.
    used = [result.costs[p] for p in by_provider]
    assert min(used) <= result.cost_per_thousand <= max(used)

    # The sandbox's own record agrees with what the router wrote back.
    ledger = SandboxLedger(redis_client, redis_prefix)
    for provider, sent in by_provider.items():
        assert await ledger.sent_count(provider) == sent
