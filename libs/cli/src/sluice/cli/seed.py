"""The demo templates that ``sluice dev`` and ``sluice demo`` put in the database.

Seeding goes through ingest's repository (``upsert_template``), the same code template
management will use, so re-seeding an unchanged template keeps its version and a changed one
bumps it.
"""

from __future__ import annotations

from collections.abc import Iterable

from sluice.common.db import Executor
from sluice.common.templates import TemplateRow, upsert_template

FROM_ADDRESS = "Sluice Demo <noreply@sluice.example>"


def _template(
    template_id: str, subject: str, html: str, text: str, variables: tuple[str, ...]
) -> TemplateRow:
    return TemplateRow(
        id=template_id,
        version=0,  # assigned by the database
        subject=subject,
        html_body=html,
        text_body=text,
        variables=variables,
        from_address=FROM_ADDRESS,
    )


DEMO_TEMPLATES: tuple[TemplateRow, ...] = (
    _template(
        "welcome",
        "Welcome to Sluice, {{ name }}",
        "<p>Hello {{ name }},</p><p>your account is ready.</p>",
        "Hello {{ name }},\n\nyour account is ready.\n",
        ("name",),
    ),
    _template(
        "weekly-digest",
        "Your week: {{ count }} updates",
        "<p>Hi {{ name }},</p><p>{{ count }} things happened this week.</p>",
        "Hi {{ name }},\n\n{{ count }} things happened this week.\n",
        ("name", "count"),
    ),
    _template(
        "spring-sale",
        "{{ discount }} off, this week only",
        "<p>Hi {{ name }},</p><p>take <strong>{{ discount }}</strong> off everything.</p>",
        "Hi {{ name }},\n\ntake {{ discount }} off everything.\n",
        ("name", "discount"),
    ),
)


async def seed_templates(
    pool: Executor, templates: Iterable[TemplateRow] = DEMO_TEMPLATES
) -> list[TemplateRow]:
    """Creates or updates ``templates``; returns them as stored (with their versions)."""
    return [await upsert_template(pool, template) for template in templates]
