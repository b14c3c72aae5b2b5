"""``sluice partitions``: create coming months' intent partitions, drop expired ones."""

from __future__ import annotations

import asyncio

from sluice.common.db import connect
from sluice.common.logging import redact_url
from sluice.common.partitions import maintain_partitions
from sluice.common.settings import CommonSettings


def run_partitions(months_ahead: int, retain_months: int | None) -> int:
    """Runs one maintenance pass against DATABASE_URL and prints what changed."""
    settings = CommonSettings.from_env()
    url = settings.require_database()

    async def run() -> None:
        conn = await connect(url, application_name="sluice-partitions")
        try:
            changes = await maintain_partitions(
                conn, months_ahead=months_ahead, retain_months=retain_months
            )
        finally:
            await conn.close()
        for name in changes.created:
            print(f"created {name}")
        for name in changes.dropped:
            print(f"dropped {name}")
        if not changes.created and not changes.dropped:
            print(f"{redact_url(url)}: partitions are current")

    asyncio.run(run())
    return 0
