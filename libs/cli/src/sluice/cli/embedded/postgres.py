"""A throwaway PostgreSQL: initdb into a fresh folder, start, create ``sluice``, remove."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg

from sluice.cli.embedded._binaries import _find_postgres
from sluice.cli.embedded._process import (
    _new_workdir,
    _NotReady,
    _run,
    _Server,
    _start_server,
    _stop_and_remove,
)
from sluice.cli.embedded._users import _server_user, _work_base

# A Unix socket path must fit sockaddr_un.sun_path (108 bytes on Linux, NUL included).
MAX_SOCKET_PATH = 107

_logger = logging.getLogger("sluice.cli.embedded")  # one logger for the whole package


def _postgres_probe(datadir: Path) -> Callable[[int, int], Awaitable[None]]:
    async def probe(port: int, pid: int) -> None:
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=port, user="postgres", database="postgres", timeout=2
            )
            try:
                served = await conn.fetchval("SELECT current_setting('data_directory')")
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise _NotReady(f"{type(exc).__name__}: {exc}") from exc
        if served != str(datadir):
            raise _NotReady(f"port {port} is served by another PostgreSQL ({served})")

    return probe


async def _create_database(port: int, name: str) -> None:
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user="postgres", database="postgres", timeout=10
    )
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def embedded_postgres(
    state_root: Path, *, log: Callable[[str], None] = _logger.info
) -> AsyncIterator[str]:
    """A throwaway PostgreSQL server with a database ``sluice``; yields its DSN.

    The cluster lives in a fresh folder under ``state_root`` (under the system temporary
    folder instead if the server's user cannot reach ``state_root``, e.g. below /root),
    listens on 127.0.0.1 only, trusts every local connection, and is stopped and deleted
    when the context exits, whatever the reason.
    """
    started = time.monotonic()
    initdb, postgres = await _find_postgres(log)
    run_as = await _server_user(log)
    workdir = _new_workdir(_work_base(state_root, run_as, log), "postgres-")
    server: _Server | None = None
    try:
        if run_as is not None:
            os.chown(workdir, run_as.uid, run_as.gid)
        datadir = workdir / "data"
        who = f" as user {run_as.name}" if run_as else ""
        log(f"initdb {datadir}{who} ({initdb.parent})")
        await _run(
            [
                str(initdb),
                "-D",
                str(datadir),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # throwaway cluster: no need to flush it to disk
            ],
            what="initdb",
            run_as=run_as,
            cwd=workdir,
        )
        # The socket goes in the data folder, not the default /var/run/postgresql (which the
        # server's user may not write, and which the system cluster uses); TCP only if that
        # path is too long for a Unix socket.
        socket_dir = str(datadir) if len(f"{datadir}/.s.PGSQL.65535") <= MAX_SOCKET_PATH else ""

        def argv(port: int) -> list[str]:
            return [
                str(postgres),
                "-D",
                str(datadir),
                "-k",
                socket_dir,
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                # Throwaway data: durability is worthless here and costs start-up and
                # per-commit time, so never wait for the disk.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]

        # SIGINT is PostgreSQL's "fast" shutdown (what `pg_ctl stop -m fast` sends): roll
        # back open transactions, disconnect clients, exit.
        server, port = await _start_server(
            "PostgreSQL",
            argv,
            _postgres_probe(datadir),
            workdir=workdir,
            run_as=run_as,
            stop_signal=signal.SIGINT,
            log=log,
        )
        await _create_database(port, "sluice")
        dsn = f"postgresql://postgres@127.0.0.1:{port}/sluice"
        log(f"PostgreSQL ready at {dsn} ({time.monotonic() - started:.1f} s)")
        yield dsn
    finally:
        await _stop_and_remove(server, workdir, "PostgreSQL", log)
