"""The demo's spill-over: a deadline the cheapest provider alone cannot meet, and why the
routing policy spreads the campaign over providers.

A generated campaign id (``demo-YYYYmmdd-HHMMSS-wNN-xxxx``) carries its start time and a
window of NN seconds; its marketing and digest intents are due that long after the start.
The window is sized so that ``ses`` alone (14/s after a burst of 30) could send only about
60 % of them in time: the router sends what ses can finish to ses and spills the rest to
``sendgrid``, the next cheapest. The deadline is a pure function of the campaign id, so
re-running a campaign stays a retry. A campaign id given by hand has no deadline of its
own (ingest's default window) and shows plain cheapest routing.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sluice.common.model import PROTO_TO_KIND
from sluice.router.policy import Demand, PlanState, ProviderState, Verdict, decide
from sluice.v1 import intent_pb2, router_pb2

SPILL_KINDS = frozenset({"marketing", "digest"})
MIN_WINDOW_SECONDS = 5
_STAMP = "%Y%m%d-%H%M%S"


def spill_window(count: int) -> int:
    """Seconds that let ses (14/s) send about 60 % of ``count`` intents' mail that it serves
    (marketing and digest are 80 % of a demo campaign)."""
    return max(MIN_WINDOW_SECONDS, round(count * 0.8 * 0.6 / 14))


def new_campaign_id(count: int) -> str:
    """A fresh, readable campaign id whose marketing and digest deadline spills ses."""
    return (
        f"demo-{time.strftime(_STAMP, time.gmtime())}-w{spill_window(count)}-{uuid.uuid4().hex[:4]}"
    )


def campaign_deadline(campaign: str) -> datetime | None:
    """The marketing and digest deadline of a generated campaign id, else None."""
    parts = campaign.split("-")
    if len(parts) != 5 or parts[0] != "demo" or not parts[3].startswith("w"):
        return None
    try:
        start = datetime.strptime(f"{parts[1]}-{parts[2]}", _STAMP).replace(tzinfo=UTC)
        window = int(parts[3][1:])
    except ValueError:
        return None
    return start + timedelta(seconds=window)


def explain_routing(
    providers: Sequence[router_pb2.Provider],
    items: Sequence[intent_pb2.IntentSubmission],
    now: datetime,
) -> list[str]:
    """What the routing policy plans for ``items`` with ``providers`` from an empty queue:
    one line per provider and reason, with how many intents and the reason itself."""
    states = [
        ProviderState(
            name=p.name,
            cost_per_thousand=p.cost_per_thousand,
            sustained_rate=p.sustained_rate,
            burst=p.burst,
            intents=frozenset(PROTO_TO_KIND.get(int(k), "") for k in p.intents),
            enabled=p.enabled,
        )
        for p in providers
    ]
    at = now.timestamp()
    default = at + 86_400.0
    demands = [
        Demand(
            kind=PROTO_TO_KIND.get(int(i.intent), ""),
            deadline=i.deadline.ToDatetime(tzinfo=UTC).timestamp()
            if i.HasField("deadline")
            else default,
            due=at,
            needs_smtputf8=not i.recipient.rpartition("@")[0].isascii(),
        )
        for i in items
        if "@" in i.recipient and "@@" not in i.recipient  # ingest rejects the others
    ]
    decisions, _ = decide(demands, states, PlanState(), now=at)
    groups: Counter[tuple[str, str]] = Counter()
    example: dict[tuple[str, str], str] = {}
    for d in decisions:
        if d.verdict is not Verdict.ROUTE or d.provider is None:
            key = ("-", d.reason)
        else:
            key = (d.provider, d.reason.split(":")[1].split(" would")[0].strip())
        groups[key] += 1
        example.setdefault(key, d.reason)
    return [
        f"{n:>5} {example[key]}"
        for key, n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
