"""Template versions in PostgreSQL: create (a new version only when content changes), read
one version, list latest versions or one template's history.

``templates`` holds the latest version of each template (what ingest validates against and
the router sends); the ``template_versions`` history is written by a trigger on it
(0005_catalogue.sql), so this module and the demo seed (``upsert_template``) record
versions the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from sluice.common.db import Executor, db_boundary
from sluice.common.templates import UPSERT_TEMPLATE_SQL

_COLUMNS = (
    "template_id, version, subject, html_body, text_body, variables, from_address, created_at"
)

GET_VERSION_SQL = (
    f"SELECT {_COLUMNS} FROM template_versions WHERE template_id = $1 AND version = $2"
)
GET_LATEST_SQL = f"""
SELECT {_COLUMNS} FROM template_versions WHERE template_id = $1 ORDER BY version DESC LIMIT 1
"""
# Latest versions by id; the keyset is the id.
LIST_LATEST_SQL = f"""
SELECT {", ".join("v." + c.strip() for c in _COLUMNS.split(","))}
FROM templates t JOIN template_versions v ON v.template_id = t.id AND v.version = t.version
WHERE t.id > $2
ORDER BY t.id
LIMIT $1
"""
# One template's versions, newest first; the keyset is the version.
LIST_VERSIONS_SQL = f"""
SELECT {_COLUMNS} FROM template_versions
WHERE template_id = $1 AND version < $3
ORDER BY version DESC
LIMIT $2
"""


@dataclass(frozen=True, slots=True)
class TemplateVersion:
    """One immutable version of a template."""

    id: str
    version: int
    subject: str
    html_body: str
    text_body: str
    variables: tuple[str, ...]
    from_address: str
    created_at: datetime


def _version(rec: asyncpg.Record) -> TemplateVersion:
    return TemplateVersion(
        id=rec["template_id"],
        version=rec["version"],
        subject=rec["subject"],
        html_body=rec["html_body"],
        text_body=rec["text_body"],
        variables=tuple(rec["variables"]),
        from_address=rec["from_address"],
        created_at=rec["created_at"],
    )


@db_boundary
async def create_version(
    pool: asyncpg.Pool,
    *,
    template_id: str,
    subject: str,
    html_body: str,
    text_body: str,
    variables: tuple[str, ...],
    from_address: str,
) -> tuple[TemplateVersion, bool]:
    """Store the content as the template's next version unless the latest version has it
    already; returns the version and whether it is new. One transaction: the head row and
    its history row land together."""
    async with pool.acquire() as conn, conn.transaction():
        changed = await conn.fetchrow(
            UPSERT_TEMPLATE_SQL,
            template_id,
            subject,
            html_body,
            text_body,
            list(variables),
            from_address,
        )
        if changed is not None:
            rec = await conn.fetchrow(GET_VERSION_SQL, template_id, changed["version"])
        else:
            rec = await conn.fetchrow(GET_LATEST_SQL, template_id)
    assert rec is not None, "the trigger records every version of templates"
    return _version(rec), changed is not None


@db_boundary
async def get_version(
    pool: Executor, template_id: str, version: int | None
) -> TemplateVersion | None:
    """One version (the latest when ``version`` is None), or None."""
    if version is None:
        rec = await pool.fetchrow(GET_LATEST_SQL, template_id)
    else:
        rec = await pool.fetchrow(GET_VERSION_SQL, template_id, version)
    return None if rec is None else _version(rec)


@db_boundary
async def list_latest(pool: Executor, *, limit: int, after_id: str) -> list[TemplateVersion]:
    """The latest version of each template with an id after ``after_id``, by id."""
    return [_version(r) for r in await pool.fetch(LIST_LATEST_SQL, limit, after_id)]


@db_boundary
async def list_versions(
    pool: Executor, template_id: str, *, limit: int, before_version: int
) -> list[TemplateVersion]:
    """Versions of one template below ``before_version``, newest first."""
    return [
        _version(r) for r in await pool.fetch(LIST_VERSIONS_SQL, template_id, limit, before_version)
    ]
