"""Throwaway PostgreSQL and Redis for ``sluice dev`` and ``sluice demo``.

When ``DATABASE_URL`` / ``REDIS_URL`` are unset, the CLI starts its own servers from the
machine's binaries, each in a fresh temporary folder under the state folder and on a free
loopback port, and removes everything when the context exits: normally, on an exception,
on cancellation or on Ctrl-C::

    async with embedded_postgres(state) as dsn, embedded_redis(state) as redis_url:
        ...

Missing binaries are installed with ``apt-get`` when we are root on Debian/Ubuntu;
otherwise :class:`~sluice.common.errors.ConfigError` says exactly what to install.

initdb and postgres refuse to run as root, so as root they run as the ``postgres`` system
user, or a ``sluice`` system user created on demand. Redis runs as the caller.

Every server runs in its own session (``start_new_session``), so a Ctrl-C in the terminal
reaches only our process, which then stops the servers itself, in order.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from sluice.common.errors import ConfigError

__all__ = ["embedded_postgres", "embedded_redis", "find_free_port"]

INSTALL_HINT = "sudo apt-get install postgresql redis-server"
PG_LIB_ROOT = Path("/usr/lib/postgresql")  # Debian/Ubuntu: /usr/lib/postgresql/<major>/bin
START_TIMEOUT = 30.0  # seconds until a started server must accept connections
STOP_TIMEOUT = 15.0  # seconds for a graceful stop before the process group is killed
PORT_ATTEMPTS = 3  # a free port can be taken between find_free_port() and the server's bind
SERVER_USER = "sluice"  # created when running as root and there is no `postgres` user
# A Unix socket path must fit sockaddr_un.sun_path (108 bytes on Linux, NUL included).
MAX_SOCKET_PATH = 107

_logger = logging.getLogger(__name__)
_apt_lock = asyncio.Lock()
_apt_updated = False


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


# --- finding and installing binaries --------------------------------------------------


def _postgres_binaries() -> tuple[Path, Path] | None:
    """(initdb, postgres) of one installation: from PATH, else the highest Debian version."""
    candidates = [Path(d) for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    versioned: list[tuple[tuple[int, ...], Path]] = []
    for bindir in PG_LIB_ROOT.glob("*/bin"):
        with contextlib.suppress(ValueError):
            versioned.append((tuple(int(p) for p in bindir.parent.name.split(".")), bindir))
    candidates += [bindir for _, bindir in sorted(versioned, reverse=True)]
    for bindir in candidates:
        initdb, postgres = bindir / "initdb", bindir / "postgres"
        if _is_executable(initdb) and _is_executable(postgres):
            # Resolve symlinks (e.g. /usr/local/bin/initdb) so both come from one version.
            return initdb.resolve(), postgres.resolve()
    return None


def _is_executable(path: Path) -> bool:
    try:  # a PATH entry we may not read (e.g. under /root when not root) is just skipped
        return stat.S_ISREG(path.stat().st_mode) and os.access(path, os.X_OK)
    except OSError:
        return False


def _missing_error(what: str, env_var: str) -> ConfigError:
    return ConfigError(
        f"{what} not found, and it cannot be installed automatically (that needs root and "
        f"apt-get). Install it with `{INSTALL_HINT}`, or set {env_var} to a server you "
        "already run."
    )


async def _apt_install(package: str, log: Callable[[str], None]) -> bool:
    """Installs a distribution package if we can (root with apt-get); False if we cannot."""
    global _apt_updated
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    async with _apt_lock:  # dpkg takes one install at a time
        if not _apt_updated:
            log("running `apt-get update` to install missing server packages")
            await _run(["apt-get", "update"], what="apt-get update", env=env)
            _apt_updated = True
        log(f"installing {package}: `apt-get install -y --no-install-recommends {package}`")
        await _run(
            ["apt-get", "install", "-y", "--no-install-recommends", package],
            what=f"apt-get install {package}",
            env=env,
        )
    return True


async def _find_postgres(log: Callable[[str], None]) -> tuple[Path, Path]:
    found = _postgres_binaries()
    if found is None:
        log("PostgreSQL server binaries (initdb, postgres) not found")
        if not await _apt_install("postgresql", log):
            raise _missing_error("PostgreSQL (initdb and postgres)", "DATABASE_URL")
        found = _postgres_binaries()
        if found is None:
            raise ConfigError(
                "apt-get installed postgresql but initdb/postgres are still not on PATH or "
                f"under {PG_LIB_ROOT}/*/bin; set DATABASE_URL to a server you run."
            )
    return found


async def _find_redis(log: Callable[[str], None]) -> Path:
    found = shutil.which("redis-server")
    if found is None:
        log("redis-server not found on PATH")
        if not await _apt_install("redis-server", log):
            raise _missing_error("Redis (redis-server)", "REDIS_URL")
        found = shutil.which("redis-server")
        if found is None:
            raise ConfigError(
                "apt-get installed redis-server but it is still not on PATH; "
                "set REDIS_URL to a server you run."
            )
    return Path(found)


# --- running as an unprivileged user -----------------------------------------------------


async def _server_user(log: Callable[[str], None]) -> _RunAs | None:
    """None when we are not root; else the account PostgreSQL runs as (created if need be)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", SERVER_USER):
        with contextlib.suppress(KeyError):
            return _run_as(pwd.getpwnam(name))
    if shutil.which("useradd") is None:
        raise ConfigError(
            "PostgreSQL refuses to run as root and there is neither a `postgres` user nor "
            f"`useradd` to create a `{SERVER_USER}` user; run as an ordinary user or set "
            "DATABASE_URL."
        )
    log(f"creating system user {SERVER_USER!r} to run PostgreSQL (it refuses to run as root)")
    try:
        await _run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVER_USER,
            ],
            what="useradd",
        )
    except ConfigError:
        # Another process may have created it at the same moment.
        with contextlib.suppress(KeyError):
            return _run_as(pwd.getpwnam(SERVER_USER))
        raise
    return _run_as(pwd.getpwnam(SERVER_USER))


def _run_as(entry: pwd.struct_passwd) -> _RunAs:
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, groups)


def _can_traverse(path: Path, user: _RunAs) -> bool:
    """Whether ``user`` may reach ``path``: search (x) permission on it and every parent."""
    # Plain mode bits; ACLs are rare on the paths this is used for.
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in user.groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _work_base(state_root: Path, run_as: _RunAs | None, log: Callable[[str], None]) -> Path:
    """The folder that gets the server's temporary folder: the state folder if reachable."""
    root = state_root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if run_as is None or _can_traverse(root, run_as):
        return root
    fallback = Path(tempfile.gettempdir()).resolve()
    if not _can_traverse(fallback, run_as):
        raise ConfigError(
            f"user {run_as.name} can reach neither {root} nor {fallback} to keep PostgreSQL's "
            "data; use a state folder outside /root or set DATABASE_URL."
        )
    log(f"{root} is not reachable by user {run_as.name}; using {fallback} for PostgreSQL's data")
    return fallback


# --- processes ------------------------------------------------------------------------------


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


# --- PostgreSQL -------------------------------------------------------------------------------


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
        stopping = time.monotonic()
        try:
            if server is not None:
                await server.stop(log)
        finally:
            _remove(workdir, "PostgreSQL", log)
        if server is not None:
            log(f"PostgreSQL stopped, {workdir} removed ({time.monotonic() - stopping:.1f} s)")


# --- Redis ------------------------------------------------------------------------------------


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
        stopping = time.monotonic()
        try:
            if server is not None:
                await server.stop(log)
        finally:
            _remove(workdir, "Redis", log)
        if server is not None:
            log(f"Redis stopped, {workdir} removed ({time.monotonic() - stopping:.1f} s)")
