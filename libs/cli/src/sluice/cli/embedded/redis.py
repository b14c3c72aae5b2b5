"""A throwaway Redis that keeps nothing on disk."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from sluice.cli.embedded._binaries import _find_redis
from sluice.cli.embedded._process import (
    _new_workdir,
    _NotReady,
    _Server,
    _start_server,
    _stop_and_remove,
)

_logger = logging.getLogger("sluice.cli.embedded")  # one logger for the whole package


async def _probe_redis(port: int, pid: int) -> None:
    """Ready when ``INFO server`` answers with our process id (plain RESP, no client)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError) as exc:
        raise _NotReady(f"{type(exc).__name__}: {exc}") from exc
    try:
        writer.write(b"INFO server\r\n")
        header = await asyncio.wait_for(reader.readline(), 2)
        if not header.startswith(b"$"):
            # e.g. "-LOADING" while it reads a dump (never here: nothing is saved)
            raise _NotReady(f"INFO answered {header.strip()!r}")
        body = await asyncio.wait_for(reader.readexactly(int(header[1:]) + 2), 2)
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
        raise _NotReady(f"{type(exc).__name__}: {exc}") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if f"\r\nprocess_id:{pid}\r\n".encode() not in body:
        raise _NotReady(f"port {port} is served by another Redis")


@contextlib.asynccontextmanager
async def embedded_redis(
    state_root: Path, *, log: Callable[[str], None] = _logger.info
) -> AsyncIterator[str]:
    """A throwaway Redis server that keeps nothing on disk; yields ``redis://…/0``.

    It runs from a fresh folder under ``state_root``, listens on 127.0.0.1 only, and is
    stopped and its folder deleted when the context exits, whatever the reason.
    """
    started = time.monotonic()
    redis_server = await _find_redis(log)
    workdir = _new_workdir(state_root, "redis-")
    server: _Server | None = None
    try:

        def argv(port: int) -> list[str]:
            return [
                str(redis_server),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                "--dir",
                str(workdir),
            ]

        server, port = await _start_server(
            "Redis",
            argv,
            _probe_redis,
            workdir=workdir,
            run_as=None,
            stop_signal=signal.SIGTERM,
            log=log,
        )
        url = f"redis://127.0.0.1:{port}/0"
        log(f"Redis ready at {url} ({time.monotonic() - started:.1f} s)")
        yield url
    finally:
        await _stop_and_remove(server, workdir, "Redis", log)
