"""The throwaway PostgreSQL and Redis of `sluice dev`/`sluice demo`, on the real binaries:
they answer, and nothing is left running or on disk after the context exits, however it
exits."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from sluice.cli.embedded import (
    _binaries,
    _process,
    embedded_postgres,
    embedded_redis,
    find_free_port,
)
from sluice.common.errors import ConfigError

pytestmark = pytest.mark.slow  # each PostgreSQL start runs initdb (about a second)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line names ``text`` (the server and its guard)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


class _Seen:
    """What a test learns about the running servers, to check after they stop."""

    pg_pid: int
    pg_backend_pid: int
    pg_workdir: Path
    redis_pid: int
    redis_workdir: Path


async def _use_both(dsn: str, url: str, seen: _Seen) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT current_database()") == "sluice"
        await conn.execute("CREATE TABLE t (v text)")
        await conn.execute("INSERT INTO t VALUES ($1)", "hello")
        assert await conn.fetchval("SELECT v FROM t") == "hello"
        datadir = Path(await conn.fetchval("SHOW data_directory"))
        seen.pg_backend_pid = await conn.fetchval("SELECT pg_backend_pid()")
    finally:
        await conn.close()
    seen.pg_pid = int((datadir / "postmaster.pid").read_text().split()[0])
    seen.pg_workdir = datadir.parent

    client = aioredis.Redis.from_url(url)
    try:
        await client.set("k", "v")
        assert await client.get("k") == b"v"
        seen.redis_pid = int((await client.info("server"))["process_id"])
        seen.redis_workdir = Path(str((await client.config_get("dir"))["dir"]))
    finally:
        await client.aclose()


def _assert_all_gone(seen: _Seen) -> None:
    for pid in (seen.pg_pid, seen.pg_backend_pid, seen.redis_pid):
        assert not _alive(pid), f"process {pid} still running"
    for workdir in (seen.pg_workdir, seen.redis_workdir):
        assert not workdir.exists(), f"{workdir} not removed"
        assert _pids_mentioning(str(workdir)) == []


async def test_servers_answer_and_leave_nothing_behind(tmp_path: Path) -> None:
    seen = _Seen()
    lines: list[str] = []
    async with (
        embedded_postgres(tmp_path / "state", log=lines.append) as dsn,
        embedded_redis(tmp_path / "state", log=lines.append) as url,
    ):
        assert dsn.startswith("postgresql://postgres@127.0.0.1:")
        assert dsn.endswith("/sluice")
        assert url.startswith("redis://127.0.0.1:")
        assert url.endswith("/0")
        await _use_both(dsn, url, seen)
        assert _alive(seen.pg_pid)
        assert _alive(seen.redis_pid)
        assert seen.redis_workdir.parent == (tmp_path / "state").resolve()
        if os.geteuid() == 0:
            # initdb/postgres refuse root: the cluster belongs to an unprivileged user.
            assert (seen.pg_workdir / "data").stat().st_uid != 0
    _assert_all_gone(seen)
    assert any("PostgreSQL ready" in line for line in lines)
    assert any("Redis stopped" in line for line in lines)


async def test_teardown_when_the_body_raises(tmp_path: Path) -> None:
    seen = _Seen()

    async def body() -> None:
        async with (
            embedded_postgres(tmp_path, log=lambda _: None) as dsn,
            embedded_redis(tmp_path, log=lambda _: None) as url,
        ):
            await _use_both(dsn, url, seen)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await body()
    _assert_all_gone(seen)


async def test_teardown_when_cancelled(tmp_path: Path) -> None:
    """What Ctrl-C does under asyncio.run: the main task is cancelled mid-body."""
    seen = _Seen()
    ready = asyncio.Event()

    async def run() -> None:
        async with (
            embedded_postgres(tmp_path, log=lambda _: None) as dsn,
            embedded_redis(tmp_path, log=lambda _: None) as url,
        ):
            await _use_both(dsn, url, seen)
            ready.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(run())
    await asyncio.wait_for(ready.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    _assert_all_gone(seen)


@pytest.mark.parametrize(
    ("factory", "env_var"),
    [(embedded_postgres, "DATABASE_URL"), (embedded_redis, "REDIS_URL")],
)
async def test_missing_binaries_say_what_to_install(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    factory: Callable[..., AbstractAsyncContextManager[str]],
    env_var: str,
) -> None:
    # Not root (so no apt-get), nothing on PATH, no Debian PostgreSQL folder.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(_binaries, "PG_LIB_ROOT", tmp_path / "nothing")
    with pytest.raises(ConfigError) as info:
        async with factory(tmp_path / "state", log=lambda _: None):
            pytest.fail("started without binaries")
    assert "sudo apt-get install postgresql redis-server" in info.value.message
    assert env_var in info.value.message
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


@pytest.mark.skipif(os.geteuid() != 0, reason="apt-get is used only as root")
@pytest.mark.parametrize("package", ["postgresql", "redis-server"])
async def test_missing_binaries_are_installed_with_apt_get(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    # A fake apt-get that "installs" by linking the machine's real binaries into a bin
    # folder that is all of PATH.
    found = _binaries._postgres_binaries()
    redis_server = shutil.which("redis-server")
    assert found is not None
    assert redis_server is not None
    binaries = {"postgresql": list(found), "redis-server": [Path(redis_server)]}[package]
    bin_dir, calls = tmp_path / "bin", tmp_path / "apt-calls"
    bin_dir.mkdir()
    links = " ".join(f"/bin/ln -s {b} {bin_dir / b.name};" for b in binaries)
    (bin_dir / "apt-get").write_text(
        f'#!/bin/sh\necho "$*" >>{calls}\ncase "$1" in install) {links} ;; esac\n'
    )
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(_binaries, "PG_LIB_ROOT", tmp_path / "nothing")
    monkeypatch.setattr(_binaries, "_apt_updated", False)
    factory = embedded_postgres if package == "postgresql" else embedded_redis
    lines: list[str] = []
    async with factory(tmp_path / "state", log=lines.append) as url:
        assert url.startswith(("postgresql://", "redis://"))
    assert calls.read_text().splitlines() == [
        "update",
        f"install -y --no-install-recommends {package}",
    ]
    assert any("apt-get install" in line for line in lines)


async def test_a_port_taken_meanwhile_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        ports = iter([busy_port, find_free_port()])
        monkeypatch.setattr(_process, "find_free_port", lambda: next(ports))
        lines: list[str] = []
        async with embedded_redis(tmp_path, log=lines.append) as url:
            assert not url.startswith(f"redis://127.0.0.1:{busy_port}/")
            client = aioredis.Redis.from_url(url)
            try:
                assert await client.ping()
            finally:
                await client.aclose()
    assert any(f"port {busy_port} was taken" in line for line in lines)


def test_find_free_port_can_be_bound() -> None:
    port = find_free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
