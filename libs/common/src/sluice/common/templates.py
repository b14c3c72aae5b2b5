"""Templates as stored in PostgreSQL: read by ingest (validation) and the router (content
for SendBatch), written by template management and the demo seed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import asyncpg

from sluice.common.db import Executor, db_boundary

_TEMPLATE_COLUMNS = "id, version, subject, html_body, text_body, variables, from_address"

GET_TEMPLATES_SQL = f"SELECT {_TEMPLATE_COLUMNS} FROM templates WHERE id = ANY($1::text[])"

# Insert at version 1, or replace the content and bump the version, but only if the content
# differs: re-applying the same template is a no-op that keeps its version (and returns no
# row, hence the fallback SELECT).
UPSERT_TEMPLATE_SQL = f"""
INSERT INTO templates (id, subject, html_body, text_body, variables, from_address)
VALUES ($1, $2, $3, $4, $5::text[], $6)
ON CONFLICT (id) DO UPDATE SET
    version = templates.version + 1,
    subject = EXCLUDED.subject,
    html_body = EXCLUDED.html_body,
    text_body = EXCLUDED.text_body,
    variables = EXCLUDED.variables,
    from_address = EXCLUDED.from_address,
    updated_at = now()
WHERE (templates.subject, templates.html_body, templates.text_body, templates.variables,
       templates.from_address)
      IS DISTINCT FROM
      (EXCLUDED.subject, EXCLUDED.html_body, EXCLUDED.text_body, EXCLUDED.variables,
       EXCLUDED.from_address)
RETURNING {_TEMPLATE_COLUMNS}
"""
GET_TEMPLATE_SQL = f"SELECT {_TEMPLATE_COLUMNS} FROM templates WHERE id = $1"


@dataclass(frozen=True, slots=True)
class TemplateRow:
    """A template. ``version`` is assigned by the database; it is ignored on upsert."""

    id: str
    version: int
    subject: str
    html_body: str
    text_body: str
    variables: tuple[str, ...]
    from_address: str


def _template_row(rec: asyncpg.Record) -> TemplateRow:
    return TemplateRow(
        id=rec["id"],
        version=rec["version"],
        subject=rec["subject"],
        html_body=rec["html_body"],
        text_body=rec["text_body"],
        variables=tuple(rec["variables"]),
        from_address=rec["from_address"],
    )


@db_boundary
async def get_templates(pool: Executor, ids: Iterable[str]) -> dict[str, TemplateRow]:
    """Return the templates with these ids, keyed by id; unknown ids are simply absent."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    return {rec["id"]: _template_row(rec) for rec in await pool.fetch(GET_TEMPLATES_SQL, wanted)}


@db_boundary
async def upsert_template(pool: Executor, template: TemplateRow) -> TemplateRow:
    """Create or replace a template and return it as stored.

    A new template gets version 1; a change of any content field bumps the version by one;
    storing identical content changes nothing (same version, same ``updated_at``).
    ``template.version`` is ignored.
    """
    args = (
        template.id,
        template.subject,
        template.html_body,
        template.text_body,
        list(template.variables),
        template.from_address,
    )
    rec = await pool.fetchrow(UPSERT_TEMPLATE_SQL, *args)
    if rec is None:
        rec = await pool.fetchrow(GET_TEMPLATE_SQL, template.id)
    assert rec is not None, "a template the upsert skipped as unchanged must exist"
    return _template_row(rec)


TEMPLATE_TTL_SECONDS = 10.0


class TemplateCache:
    """Templates by id, kept ``ttl`` seconds; the ids not held load in one query.

    Ingest validates every submission against its template and the router sends every
    batch with one; templates change rarely, so this keeps them off the hot path. An
    edited template takes effect within ``ttl``. A missing id is not cached, so a template
    created just after a request named it works on the next request.
    """

    def __init__(
        self,
        pool: Executor,
        *,
        ttl: float = TEMPLATE_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[str, tuple[float, TemplateRow]] = {}

    async def get_many(self, ids: Iterable[str]) -> dict[str, TemplateRow]:
        """The templates among ``ids`` that exist, keyed by id."""
        now = self._clock()
        found: dict[str, TemplateRow] = {}
        missing: list[str] = []
        for template_id in set(ids):
            if not template_id:
                continue
            entry = self._entries.get(template_id)
            if entry is not None and now - entry[0] < self._ttl:
                found[template_id] = entry[1]
            else:
                missing.append(template_id)
        if missing:
            for template_id, row in (await get_templates(self._pool, missing)).items():
                self._entries[template_id] = (now, row)
                found[template_id] = row
        return found
