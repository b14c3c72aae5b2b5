"""Running as an unprivileged user: initdb and postgres refuse root, so as root they run as
the ``postgres`` system user, or a ``sluice`` one created on demand, from a folder it can reach."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from sluice.cli.embedded._process import _run, _RunAs
from sluice.common.errors import ConfigError

SERVER_USER = "sluice"  # created when running as root and there is no `postgres` user


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
