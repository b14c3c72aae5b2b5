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

from sluice.cli.embedded._process import find_free_port
from sluice.cli.embedded.postgres import embedded_postgres
from sluice.cli.embedded.redis import embedded_redis

__all__ = ["embedded_postgres", "embedded_redis", "find_free_port"]
