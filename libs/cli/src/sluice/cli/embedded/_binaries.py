"""Finding the server binaries, and installing them with apt-get when we can."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from sluice.cli.embedded._process import _run
from sluice.common.errors import ConfigError

INSTALL_HINT = "sudo apt-get install postgresql redis-server"
PG_LIB_ROOT = Path("/usr/lib/postgresql")  # Debian/Ubuntu: /usr/lib/postgresql/<major>/bin

_apt_lock = asyncio.Lock()
_apt_updated = False


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
