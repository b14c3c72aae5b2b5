"""Server processes: a free port, starting a server in its own process group and waiting
until it answers, the guard process that cleans up if we die, and stopping (or killing) it."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sluice.common.errors import ConfigError

START_TIMEOUT = 30.0  # seconds until a started server must accept connections
STOP_TIMEOUT = 15.0  # seconds for a graceful stop before the process group is killed
PORT_ATTEMPTS = 3  # a free port can be taken between find_free_port() and the server's bind


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged account a server runs as when we are root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


class _PortInUse(Exception):
    """The server lost the race for its port; try another one."""


class _NotReady(Exception):
    """A readiness probe did not get its answer yet."""


# Run by a small guard process per server: if our process dies without stopping the server
# (SIGKILL, an unhandled SIGTERM/SIGHUP), its end of the pipe closes and the guard kills the
# server's process group and removes its folder. A normal stop writes "release" first. The
# start time from /proc makes sure a recycled pid is never killed.
_GUARD = """# sluice: guard of an embedded server
import os, shutil, signal, sys, time
pgid, workdir = int(sys.argv[1]), sys.argv[2]
def born():
    try:
        with open(f"/proc/{pgid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
start = born()
if sys.stdin.buffer.read() != b"release":
    if start is not None and born() == start:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except OSError:
                break
            time.sleep(0.05)
    shutil.rmtree(workdir, ignore_errors=True)
"""


class _Server:
    """A server process we started, in its own process group, and how to stop it."""

    def __init__(
        self,
        name: str,
        proc: asyncio.subprocess.Process,
        guard: asyncio.subprocess.Process,
        log_path: Path,
        stop_signal: signal.Signals,
    ) -> None:
        self.name = name
        self.proc = proc
        self.guard = guard
        self.log_path = log_path
        self.stop_signal = stop_signal
        # If the event loop goes away before our context exits (e.g. sys.exit from a
        # callback), stop at interpreter exit rather than leave the server behind.
        atexit.register(self.kill)

    def log_tail(self, lines: int = 25) -> str:
        """The last lines the server printed."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def kill(self) -> None:
        """SIGKILL the server's whole process group (e.g. postmaster and backends)."""
        # While returncode is None the child is not reaped, so its pid (= pgid) is not
        # reused. The guard stays: it removes the folder if we die before our caller does.
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def stop(self, log: Callable[[str], None]) -> None:
        """Graceful stop, then SIGKILL after STOP_TIMEOUT; kills at once if interrupted."""
        try:
            if self.proc.returncode is None:
                # os.kill, not proc.send_signal: the latter polls (reaps) the child behind
                # the back of asyncio's child watcher.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, self.stop_signal)
                try:
                    await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
                except TimeoutError:
                    log(f"{self.name} did not stop within {STOP_TIMEOUT:.0f} s; killing it")
                    self.kill()
                    await self.proc.wait()
            await _release_guard(self.guard)
        except BaseException:
            # Cancelled again or interrupted while stopping: do not wait, but do not leave
            # the server running either.
            self.kill()
            raise
        finally:
            if self.proc.returncode is not None:
                atexit.unregister(self.kill)


async def _spawn_guard(pgid: int, workdir: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",  # isolated: no user site, no environment variables, no cwd on sys.path
        "-S",  # no site import: starts faster
        "-c",
        _GUARD,
        str(pgid),
        str(workdir),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C and SIGHUP of our terminal must not reach it
    )


async def _release_guard(guard: asyncio.subprocess.Process) -> None:
    """Tells the guard that the server was stopped properly, and waits until it exits."""
    if guard.returncode is None:
        assert guard.stdin is not None
        with contextlib.suppress(ConnectionError):
            guard.stdin.write(b"release")
            guard.stdin.close()
            await guard.stdin.wait_closed()
        try:
            await asyncio.wait_for(guard.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(guard.pid, signal.SIGKILL)
            await guard.wait()


def _child_env() -> dict[str, str]:
    # A fixed C locale: initdb fails on a LANG whose locale is not generated.
    return {**os.environ, "LC_ALL": "C"}


async def _run(
    argv: Sequence[str],
    *,
    what: str,
    run_as: _RunAs | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Runs a command to completion; ConfigError with its output if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,
        env=env if env is not None else _child_env(),
        start_new_session=True,
        user=run_as.uid if run_as else None,
        group=run_as.gid if run_as else None,
        extra_groups=list(run_as.groups) if run_as else None,
    )
    try:
        out, _ = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            # SIGTERM first: apt-get and initdb clean up after themselves on it. Wait a
            # little, so that our caller does not remove a folder initdb still writes to.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            finally:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise ConfigError(f"{what} failed with exit code {proc.returncode}:\n{tail}")
    return text


async def _start_server(
    name: str,
    make_argv: Callable[[int], list[str]],
    probe: Callable[[int, int], Awaitable[None]],
    *,
    workdir: Path,
    run_as: _RunAs | None,
    stop_signal: signal.Signals,
    log: Callable[[str], None],
) -> tuple[_Server, int]:
    """Starts a server on a free port and waits until ``probe(port, pid)`` succeeds.

    The probe also checks that it reached *our* server: if another process took the port
    first, ours exits ("Address already in use") and we try again on another port.
    """
    log_path = workdir / f"{name.lower()}.log"
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = find_free_port()
        with log_path.open("wb") as out:  # the child keeps its own copy of the descriptor
            proc = await asyncio.create_subprocess_exec(
                *make_argv(port),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=workdir,
                env=_child_env(),
                start_new_session=True,
                user=run_as.uid if run_as else None,
                group=run_as.gid if run_as else None,
                extra_groups=list(run_as.groups) if run_as else None,
            )
        try:
            guard = await _spawn_guard(proc.pid, workdir)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        server = _Server(name, proc, guard, log_path, stop_signal)
        try:
            await _wait_ready(server, port, probe)
        except _PortInUse:
            await server.stop(log)
            log(f"{name}: port {port} was taken meanwhile (attempt {attempt}); trying another")
            continue
        except BaseException:
            await server.stop(log)
            raise
        return server, port
    raise ConfigError(f"{name} could not bind a free port in {PORT_ATTEMPTS} attempts")


async def _wait_ready(
    server: _Server, port: int, probe: Callable[[int, int], Awaitable[None]]
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    last_error = "no answer yet"
    while True:
        if server.proc.returncode is not None:
            tail = server.log_tail()
            if "Address already in use" in tail:
                raise _PortInUse
            raise ConfigError(
                f"{server.name} exited with code {server.proc.returncode} before accepting "
                f"connections; the end of its log:\n{tail}"
            )
        try:
            await probe(port, server.proc.pid)
        except _NotReady as exc:
            last_error = str(exc)
        else:
            return
        if loop.time() >= deadline:
            raise ConfigError(
                f"{server.name} did not accept connections on 127.0.0.1:{port} within "
                f"{START_TIMEOUT:.0f} s ({last_error}); the end of its log:\n{server.log_tail()}"
            )
        await asyncio.sleep(0.1)


def _new_workdir(base: Path, prefix: str) -> Path:
    base = base.resolve()
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _remove(workdir: Path, what: str, log: Callable[[str], None]) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    if workdir.exists():
        log(f"could not remove {what} folder {workdir}")


async def _stop_and_remove(
    server: _Server | None, workdir: Path, what: str, log: Callable[[str], None]
) -> None:
    """Stops ``server`` (if it started) and removes its folder, even if stopping fails."""
    stopping = time.monotonic()
    try:
        if server is not None:
            await server.stop(log)
    finally:
        _remove(workdir, what, log)
    if server is not None:
        log(f"{what} stopped, {workdir} removed ({time.monotonic() - stopping:.1f} s)")
