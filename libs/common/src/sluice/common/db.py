"""PostgreSQL access: the connection pool every service uses, and the schema migrator.

Migrations are plain SQL files shipped inside this package
(``sluice/common/migrations/NNNN_name.sql``), applied in version order by :func:`migrate`,
which any number of processes may run at once (a deploy Job, ``sluice migrate``, a test
fixture): a PostgreSQL advisory lock serialises them, each migration commits together with
its ``schema_migrations`` row, and versions already recorded are skipped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, ParamSpec, TypeAlias, TypeVar

import asyncpg

from sluice.common.errors import ConfigError, InvalidArgument, SluiceError, Unavailable
from sluice.common.logging import redact_url

__all__ = [
    "MIGRATION_LOCK_KEY",
    "Executor",
    "Migration",
    "connect",
    "create_pool",
    "database_error",
    "db_boundary",
    "migrate",
    "migrations",
    "rows_affected",
]

#: Either a pool (each call borrows a connection) or a connection the caller already holds,
#: e.g. inside a transaction. The repositories accept both.
Executor: TypeAlias = "asyncpg.Pool[asyncpg.Record] | asyncpg.Connection[asyncpg.Record]"

#: Key of the session-level advisory lock that serialises migrators. Fixed, so that every
#: version of Sluice contends on the same lock: b"sluice\x00\x01" read as a signed bigint.
MIGRATION_LOCK_KEY = 0x736C_7569_6365_0001

_MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<label>[a-z0-9_]+)\.sql$")

CREATE_MIGRATIONS_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
LOCK_SQL = "SELECT pg_advisory_lock($1)"
UNLOCK_SQL = "SELECT pg_advisory_unlock($1)"
APPLIED_SQL = "SELECT version, name FROM schema_migrations ORDER BY version"
RECORD_SQL = "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)"

# Errors that mean "the server is not reachable or not accepting us right now": retrying
# later can succeed, so they become Unavailable. Authentication failures and an unknown
# database are configuration mistakes and become ConfigError instead.
_TRANSIENT_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, unreachable, DNS failure, reset
    TimeoutError,
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.CannotConnectNowError,  # 57P03: starting up / shutting down / recovery
    asyncpg.TooManyConnectionsError,  # 53300
    asyncpg.InterfaceError,  # connection closed under us during the handshake
)
_CONFIG_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InvalidAuthorizationSpecificationError,  # 28000, 28P01: role or password
    asyncpg.InvalidCatalogNameError,  # 3D000: no such database
)


# Errors of a statement that say nothing about the statement itself: the connection was
# lost or broken, the server is restarting, shutting down, overloaded or cancelled us (a
# statement timeout), or a transaction lost a race. Retrying later can succeed.
_RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    *_TRANSIENT_CONNECT_ERRORS,
    # "cannot switch to state 12; another operation is in progress": a connection that a
    # server restart left half-way through a protocol exchange.
    asyncpg.exceptions.InternalClientError,
    asyncpg.OperatorInterventionError,  # 57P01 admin shutdown, 57014 statement timeout
    asyncpg.InsufficientResourcesError,  # 53xxx: out of memory, disk full, connections
    asyncpg.TransactionRollbackError,  # 40001 serialization failure, 40P01 deadlock
)
P = ParamSpec("P")
R = TypeVar("R")


def database_error(exc: BaseException) -> SluiceError | None:
    """The Sluice error a database exception means, or None when it is a bug of ours.

    This is the one place asyncpg's exceptions are interpreted: repositories call the
    database through :func:`db_boundary`, so every service sees the same ``Unavailable`` for a
    lost connection, a restart or a statement timeout (callers may retry) and no servicer
    ever handles asyncpg exceptions itself.
    """
    if isinstance(exc, SluiceError):
        return exc
    if isinstance(exc, _RETRYABLE_ERRORS):
        return Unavailable(f"database unavailable: {type(exc).__name__}: {exc}")
    if isinstance(exc, asyncpg.DataError):
        # Validation should refuse such values first (a NUL byte, an out-of-range number);
        # if one slips through it is still the caller's input, not an internal error.
        return InvalidArgument(
            f"a value was refused by the database: {exc}", [("request", str(exc)[:200])]
        )
    return None


def db_boundary(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorates a repository function so database exceptions leave it as Sluice errors."""

    @functools.wraps(fn)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except SluiceError:
            raise
        except Exception as exc:
            mapped = database_error(exc)
            if mapped is None:
                raise
            raise mapped from exc

    return guarded


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL migration file: ``version`` from its 4-digit prefix, ``name`` its file stem."""

    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Return the migrations shipped with this package, in version order.

    Raises ConfigError if two files share a version or a ``.sql`` file is misnamed, so a
    broken package fails loudly instead of skipping a migration.
    """
    folder = resources.files("sluice.common").joinpath("migrations")
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_FILE.match(entry.name)
        if match is None:
            raise ConfigError(f"migration file name {entry.name!r} is not NNNN_name.sql")
        version = int(match["version"])
        if version in found:
            raise ConfigError(f"two migrations share version {version}")
        name = entry.name.removesuffix(".sql")
        found[version] = Migration(version, name, entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def _wrap_connect_error(dsn: str, exc: BaseException) -> Exception:
    where = redact_url(dsn)
    if isinstance(exc, _CONFIG_CONNECT_ERRORS):
        return ConfigError(f"PostgreSQL at {where} refused the configuration: {exc}")
    return Unavailable(f"PostgreSQL at {where} is unavailable: {exc}")


async def _init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Per-connection setup: jsonb and json travel as Python dicts/lists, not strings."""
    for typename in ("jsonb", "json"):
        await conn.set_type_codec(
            typename, schema="pg_catalog", encoder=_json_dumps, decoder=json.loads
        )


def _json_dumps(value: Any) -> str:
    # Compact separators: smaller rows and wire payloads, same meaning.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset that sends nothing.

    asyncpg rolls back an open transaction on release in any case; its default reset then
    also sends ``RESET ALL; UNLISTEN *; CLOSE ALL; pg_advisory_unlock_all()``, a round trip
    per release. Sluice sets no session state on pooled connections (no SET, LISTEN,
    cursors or advisory locks: migrations take theirs on a connection of their own), so that
    round trip bought nothing; it was 6 % of ingest's CPU under unary load.
    """


# Session settings of every Sluice connection. random_page_cost: PostgreSQL's default (4.0)
# prices an index probe as a seek on a spinning disk, and at that price the router's
# write-back of 500 rows by primary key (COMPLETE_SQL) was planned as a hash join over a
# sequential scan of the whole partition: 7 ms at 40,000 rows, growing with the queue. On
# SSDs with the working set cached, 1.1 is the usual figure, and the plan becomes 500 index
# probes (3 ms, flat). Set per session so an operator's server-wide value for other
# databases is left alone.
SESSION_SETTINGS = {"random_page_cost": "1.1"}


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    application_name: str = "sluice",
    command_timeout: float | None = 60.0,
) -> asyncpg.Pool[asyncpg.Record]:
    """Open an asyncpg pool to ``dsn`` with the jsonb <-> dict codec on every connection.

    ``application_name`` shows up in ``pg_stat_activity``. ``command_timeout`` bounds every
    statement (seconds; None disables it). Raises Unavailable when the server cannot be
    reached (safe to retry) and ConfigError when it rejects the role, password or database.
    """
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_keep_session,
            command_timeout=command_timeout,
            server_settings={**SESSION_SETTINGS, "application_name": application_name},
        )
    except (*_TRANSIENT_CONNECT_ERRORS, *_CONFIG_CONNECT_ERRORS) as exc:
        raise _wrap_connect_error(dsn, exc) from exc
    return pool


async def connect(dsn: str, *, application_name: str = "sluice") -> asyncpg.Connection[Any]:
    """Open one connection (jsonb codec included), wrapping errors like :func:`create_pool`."""
    try:
        conn = await asyncpg.connect(
            dsn, server_settings={**SESSION_SETTINGS, "application_name": application_name}
        )
    except (*_TRANSIENT_CONNECT_ERRORS, *_CONFIG_CONNECT_ERRORS) as exc:
        raise _wrap_connect_error(dsn, exc) from exc
    try:
        await _init_connection(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


def rows_affected(status: str) -> int:
    """Row count from an asyncpg command status such as ``"UPDATE 42"`` or ``"INSERT 0 3"``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


async def migrate(dsn_or_conn: str | asyncpg.Connection[Any]) -> list[str]:
    """Apply the package's pending migrations; return the names applied (oldest first).

    ``dsn_or_conn`` is a DSN (a connection is opened and closed here) or an open connection
    that is not inside a transaction. Safe to run from several processes at once: all of
    them queue on one advisory lock, and whoever gets it second finds the work done. Each
    migration runs in its own transaction together with its ``schema_migrations`` row, so a
    failed migration leaves no trace and the earlier ones stay applied.

    Raises ConfigError if the database recorded a version under a different name than the
    shipped file (a migration was renamed or replaced after release). Versions the database
    has but this code does not know (a newer release migrated it) are left alone.
    """
    if isinstance(dsn_or_conn, str):
        conn = await connect(dsn_or_conn, application_name="sluice-migrate")
        try:
            return await _migrate_locked(conn)
        finally:
            await conn.close()
    return await _migrate_locked(dsn_or_conn)


async def _migrate_locked(conn: asyncpg.Connection[Any]) -> list[str]:
    # Session-level lock (not xact-level) because it must span one transaction per
    # migration. If this process dies holding it, the server releases it with the session.
    await conn.execute(LOCK_SQL, MIGRATION_LOCK_KEY)
    try:
        # Under the lock: concurrent CREATE TABLE IF NOT EXISTS is not race-free in
        # PostgreSQL (it can fail on the pg_type unique index).
        await conn.execute(CREATE_MIGRATIONS_TABLE_SQL)
        recorded = {int(r["version"]): str(r["name"]) for r in await conn.fetch(APPLIED_SQL)}
        applied: list[str] = []
        for migration in migrations():
            known = recorded.get(migration.version)
            if known is not None:
                if known != migration.name:
                    raise ConfigError(
                        f"database has migration {migration.version} as {known!r}, "
                        f"this release ships {migration.name!r}"
                    )
                continue
            async with conn.transaction():
                # No arguments: asyncpg uses the simple query protocol, which runs a
                # multi-statement script as is.
                await conn.execute(migration.sql)
                await conn.execute(RECORD_SQL, migration.version, migration.name)
            applied.append(migration.name)
        return applied
    finally:
        # If the session is gone the server has already dropped the lock; do not let a
        # failing unlock hide the error that got us here.
        if not conn.is_closed():
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.execute(UNLOCK_SQL, MIGRATION_LOCK_KEY)
