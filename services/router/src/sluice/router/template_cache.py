"""The dispatcher's template cache: SendBatch template content by id, for a few seconds."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from sluice.common.db import Executor
from sluice.common.templates import TemplateRow, get_templates
from sluice.v1 import sender_pb2

__all__ = ["TemplateCache"]

TEMPLATE_TTL_SECONDS = 10.0


class TemplateCache:
    """Template content by id, kept ``ttl`` seconds; missing ids load in one query.

    An edited template reaches sends within ``ttl``. A template that does not exist is not
    cached, so creating it later takes effect on the next round.
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
        self._entries: dict[str, tuple[float, sender_pb2.TemplateContent]] = {}

    async def get_many(self, ids: Iterable[str]) -> dict[str, sender_pb2.TemplateContent]:
        """The templates among ``ids`` that exist, as SendBatch content."""
        now = self._clock()
        found: dict[str, sender_pb2.TemplateContent] = {}
        missing: list[str] = []
        for template_id in set(ids):
            entry = self._entries.get(template_id)
            if entry is not None and now - entry[0] < self._ttl:
                found[template_id] = entry[1]
            else:
                missing.append(template_id)
        if missing:
            for template_id, row in (await get_templates(self._pool, missing)).items():
                content = _template_content(row)
                self._entries[template_id] = (now, content)
                found[template_id] = content
        return found


def _template_content(row: TemplateRow) -> sender_pb2.TemplateContent:
    return sender_pb2.TemplateContent(
        id=row.id,
        version=row.version,
        subject=row.subject,
        html_body=row.html_body,
        text_body=row.text_body,
        variables=list(row.variables),
        from_address=row.from_address,
    )
