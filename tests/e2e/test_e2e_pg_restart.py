"""PostgreSQL restarts under load: no process exits, no client sees INTERNAL, nothing
acknowledged is lost.

A throwaway PostgreSQL (never the shared one: other tests use it) is restarted twice with
``pg_ctl restart -m fast`` while unary ``SubmitIntent`` callers and a router and sender keep
working through real ``sluice serve`` processes. During the outage clients may see
UNAVAILABLE (the answer that tells them to retry), never INTERNAL or UNKNOWN: before the
database errors were mapped once at the repository boundary, asyncpg's
``InternalClientError: cannot switch to state ...`` reached clients as INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import grpc
import pytest

from sluice.cli.embedded import embedded_postgres
from sluice.cli.embedded._binaries import _find_postgres
from sluice.cli.embedded._users import _server_user
from sluice.common.db import migrate
from sluice.common.errors import ConfigError
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, intent_pb2
from tests.e2e.e2e_stack import service_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CALLERS = 8
RESTARTS = 2
SETTLE_SECONDS = 60.0


async def _pg_ctl(datadir: str, *args: str) -> None:
    """Runs pg_ctl on the throwaway cluster as the server's own user.

    Spawned with posix_spawn (no cwd, no close_fds, no user switch in Python; ``runuser``
    switches user): a plain fork of this process, whose gRPC threads are busy, runs
    gRPC's fork handlers in the child, which crashed pg_ctl with SIGSEGV now and then.
    """
    initdb, _ = await _find_postgres(print)
    run_as = await _server_user(print)
    log_file = str(Path(datadir).parent / "pg_ctl.log")
    argv = [str(Path(initdb).parent / "pg_ctl"), "-D", datadir, "-l", log_file, "-w", "-t", "60"]
    if run_as is not None:
        runuser = shutil.which("runuser")
        assert runuser, "runuser (util-linux) is needed to run pg_ctl as the server's user"
        argv = [runuser, "-u", run_as.name, "--", *argv]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        close_fds=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise ConfigError(f"pg_ctl {' '.join(args)} failed ({proc.returncode}): {out.decode()}")


async def test_postgres_restarts_under_load_lose_nothing_and_never_answer_internal(
    tmp_path: Path, redis_prefix: str
) -> None:
    async with embedded_postgres(tmp_path, log=print) as dsn:
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            datadir = str(await conn.fetchval("SHOW data_directory"))
            await conn.execute(
                "INSERT INTO templates (id, subject, html_body, text_body, variables,"
                " from_address) VALUES ('welcome', 'Hi {{ name }}', '<p>Hi</p>', 'Hi',"
                " ARRAY['name'], 'noreply@example.com')"
            )
        finally:
            await conn.close()
        restarted_by_pg_ctl = False
        try:
            async with service_stack(
                database_url=dsn,
                redis_prefix=redis_prefix,
                log_dir=tmp_path / "logs",
                # The services log the outage (warnings, errors of rounds that failed):
                # expected here; what must not happen is an exit or an INTERNAL answer.
                allow_errors=True,
                SLUICE_LEASE_SECONDS="4",
                SLUICE_SENDER_TIMEOUT_SECONDS="2",
                SLUICE_RETRY_BASE_SECONDS="0.2",
                SLUICE_RETRY_MAX_SECONDS="1",
            ) as stack:
                sender = await stack.start("sender")
                ingest, router = await asyncio.gather(
                    stack.start("ingest"),
                    stack.start("router", SLUICE_SENDER_TARGET=sender.target),
                )
                codes: Counter[str] = Counter()
                acked: set[str] = set()
                stop = asyncio.Event()

                async def caller(n: int) -> None:
                    async with grpc.aio.insecure_channel(ingest.target) as channel:
                        stub = ingest_pb2_grpc.IngestServiceStub(channel)
                        i = 0
                        while not stop.is_set():
                            i += 1
                            sub = intent_pb2.IntentSubmission(
                                idempotency_key=f"pg-{n}-{i}-{uuid.uuid4().hex[:6]}",
                                recipient=f"user{n}.{i}@example.com",
                                intent=intent_pb2.INTENT_TRANSACTIONAL,
                                template_id="welcome",
                                variables={"name": "Ada"},
                            )
                            try:
                                reply = await stub.SubmitIntent(
                                    ingest_pb2.SubmitIntentRequest(intent=sub), timeout=10
                                )
                            except grpc.aio.AioRpcError as exc:
                                codes[exc.code().name] += 1
                                await asyncio.sleep(0.05)
                            else:
                                codes["OK"] += 1
                                acked.add(reply.intent.id)

                callers = [asyncio.create_task(caller(n)) for n in range(CALLERS)]
                try:
                    for _ in range(RESTARTS):
                        await asyncio.sleep(2.0)
                        restarted_by_pg_ctl = True
                        await _pg_ctl(datadir, "restart", "-m", "fast")
                    await asyncio.sleep(2.0)
                finally:
                    stop.set()
                    await asyncio.gather(*callers)

                print(f"answers during {RESTARTS} restarts: {dict(codes)}")
                assert codes["OK"] > 0
                assert codes["INTERNAL"] == 0, codes
                assert codes["UNKNOWN"] == 0, codes
                assert set(codes) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, codes
                for process in (ingest, router, sender):
                    assert process.proc.returncode is None, f"{process.name} exited"

                # Promise 1: every acknowledged intent is sent once the database is back.
                deadline = time.monotonic() + SETTLE_SECONDS
                statuses: Counter[str] = Counter()
                while time.monotonic() < deadline:
                    conn = await asyncpg.connect(dsn)
                    try:
                        rows = await conn.fetch(
                            "SELECT status::text AS s, count(*) AS n FROM intents"
                            " WHERE id = ANY($1::uuid[]) GROUP BY 1",
                            list(acked),
                        )
                    finally:
                        await conn.close()
                    statuses = Counter({r["s"]: int(r["n"]) for r in rows})
                    if statuses.get("sent", 0) == len(acked):
                        break
                    await asyncio.sleep(0.5)
                assert statuses == Counter({"sent": len(acked)}), statuses
        finally:
            if restarted_by_pg_ctl:
                # pg_ctl started a new postmaster the embedded helper does not know: stop
                # it before the helper removes its data folder.
                with contextlib.suppress(ConfigError):
                    await _pg_ctl(datadir, "stop", "-m", "immediate")
    assert not await asyncio.to_thread(os.path.exists, datadir)
