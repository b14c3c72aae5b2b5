"""Scheduling: local wall-clock times (DST gaps and overlaps) and deadline windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.ingest.schedule import LocalTimeError, local_to_utc, resolve
from sluice.v1 import ingest_pb2, intent_pb2
from tests.catalogue.catalogue_fixtures import (
    Stubs,
    next_berlin_spring_forward,
    submission,
    welcome,
)
from tests.grpc_helpers import field_violations

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
WINDOWS = {
    "transactional": timedelta(hours=1),
    "marketing": timedelta(days=1),
    "digest": timedelta(hours=12),
}


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def run(
    sub: intent_pb2.IntentSubmission, kind: str = "marketing"
) -> tuple[datetime, datetime, list[tuple[str, str]]]:
    bad: list[tuple[str, str]] = []
    send_at, deadline = resolve(
        sub, kind, now=NOW, windows=WINDOWS, bad=lambda f, d: bad.append((f, d))
    )
    return send_at, deadline, bad


def test_an_ordinary_local_time_converts_with_its_offset() -> None:
    assert local_to_utc("2026-06-01T09:00:00", "Europe/Berlin") == datetime(
        2026, 6, 1, 7, 0, tzinfo=UTC
    )
    assert local_to_utc("2026-01-15T09:00", "America/New_York") == datetime(
        2026, 1, 15, 14, 0, tzinfo=UTC
    )


def test_the_hour_that_does_not_exist_moves_forward_by_the_gap() -> None:
    # Europe/Berlin, 29 March 2026: 02:00 CET jumps to 03:00 CEST; 02:30 never happens.
    got = local_to_utc("2026-03-29T02:30:00", "Europe/Berlin")
    assert got == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    assert got.astimezone(ZoneInfo("Europe/Berlin")).strftime("%H:%M %Z") == "03:30 CEST"


def test_the_hour_that_happens_twice_means_the_first() -> None:
    # Europe/Berlin, 25 October 2026: 03:00 CEST falls back to 02:00 CET; 02:30 happens at
    # 00:30 UTC (CEST) and again at 01:30 UTC (CET). The first is meant.
    got = local_to_utc("2026-10-25T02:30:00", "Europe/Berlin")
    assert got == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert got.astimezone(ZoneInfo("Europe/Berlin")).strftime("%H:%M %Z") == "02:30 CEST"


ZONES = [
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "America/Santiago",
]


def _oracle(wall: datetime, tz: ZoneInfo) -> datetime:
    """The rule by brute force: scan every UTC minute around the wall time."""
    naive_utc = wall.replace(tzinfo=UTC)
    minutes = [naive_utc + timedelta(minutes=m) for m in range(-16 * 60, 16 * 60)]
    matches = [m for m in minutes if m.astimezone(tz).replace(tzinfo=None) == wall]
    if matches:
        return matches[0]  # the first of the instants that show this wall time
    # a gap: the instant the clocks jumped, plus how far into the skipped range it lies
    jump = next(m for m in minutes if m.astimezone(tz).replace(tzinfo=None) > wall)
    gap_start = (jump - timedelta(minutes=1)).astimezone(tz).replace(tzinfo=None)
    return jump + (wall - gap_start - timedelta(minutes=1))


@settings(max_examples=60, deadline=None)
@given(
    wall=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2027, 12, 31)).map(
        lambda d: d.replace(second=0, microsecond=0)
    ),
    zone=st.sampled_from(ZONES),
)
def test_rule_holds_for_any_time_in_any_zone(wall: datetime, zone: str) -> None:
    assert local_to_utc(wall.isoformat(), zone) == _oracle(wall, ZoneInfo(zone))


@pytest.mark.parametrize("zone", ZONES)
def test_the_oracle_meets_gaps_and_overlaps(zone: str) -> None:
    # The property above only means something if its examples include both kinds.
    tz = ZoneInfo(zone)
    kinds = set()
    wall = datetime(2026, 1, 1)
    while wall < datetime(2027, 1, 1):
        fold0 = wall.replace(tzinfo=tz, fold=0).utcoffset()
        fold1 = wall.replace(tzinfo=tz, fold=1).utcoffset()
        if fold0 != fold1:
            exists = (
                local_to_utc(wall.isoformat(), zone).astimezone(tz).replace(tzinfo=None) == wall
            )
            kinds.add("overlap" if exists else "gap")
            assert local_to_utc(wall.isoformat(), zone) == _oracle(wall, tz)
        wall += timedelta(minutes=30)
    assert kinds == ({"gap", "overlap"} if zone != "Asia/Kolkata" else set())


@pytest.mark.parametrize(
    ("date_time", "zone", "field"),
    [
        ("2026-06-01T09:00:00", "Mars/Olympus_Mons", "time_zone"),
        ("2026-06-01T09:00:00", "", "time_zone"),
        ("tomorrow at nine", "Europe/Berlin", "date_time"),
        ("2026-06-01T09:00:00+02:00", "Europe/Berlin", "date_time"),
    ],
)
def test_bad_local_times_name_the_part(date_time: str, zone: str, field: str) -> None:
    with pytest.raises(LocalTimeError) as err:
        local_to_utc(date_time, zone)
    assert err.value.field == field


def test_a_past_send_at_without_deadline_gets_its_full_window_from_now() -> None:
    # Used to be counted from send_at: an hour-old send_at left a marketing intent 23 h,
    # a transactional one 0 h (expired on arrival).
    sub = submission("k", send_at=ts(NOW - timedelta(hours=1)))
    send_at, deadline, bad = run(sub, "transactional")
    assert bad == []
    assert send_at == NOW - timedelta(hours=1)
    assert deadline == NOW + timedelta(hours=1)


def test_the_epoch_is_refused_not_expired() -> None:
    _, _, bad = run(submission("k", send_at=ts(datetime(1970, 1, 1, tzinfo=UTC))))
    assert [f for f, _ in bad] == ["send_at"]
    assert "in the past" in bad[0][1]


def test_deadline_windows_are_per_kind_and_count_from_a_future_send_at() -> None:
    later = NOW + timedelta(days=2)
    for kind, window in WINDOWS.items():
        _, deadline, bad = run(submission("k", send_at=ts(later)), kind)
        assert bad == []
        assert deadline == later + window


def test_send_at_and_send_at_local_together_are_refused() -> None:
    sub = submission(
        "k",
        send_at=ts(NOW),
        send_at_local=intent_pb2.LocalDateTime(date_time="2026-06-02T09:00", time_zone="UTC"),
    )
    _, _, bad = run(sub)
    assert [f for f, _ in bad] == ["send_at_local"]


async def test_submit_converts_a_local_send_at(stubs: Stubs) -> None:
    await stubs.templates.CreateTemplate(welcome())
    day = next_berlin_spring_forward()
    local = intent_pb2.LocalDateTime(date_time=f"{day}T02:30:00", time_zone="Europe/Berlin")
    done = await stubs.ingest.SubmitIntent(
        ingest_pb2.SubmitIntentRequest(intent=submission("local-1", send_at_local=local))
    )
    # Berlin's spring-forward day: 02:30 does not exist and means 03:30 CEST (01:30 UTC)
    expected = datetime(day.year, day.month, day.day, 1, 30, tzinfo=UTC)
    assert done.intent.send_at.ToDatetime(tzinfo=UTC) == expected
    assert done.intent.deadline.ToDatetime(tzinfo=UTC) == expected + timedelta(days=1)
    again = await stubs.ingest.SubmitIntent(
        ingest_pb2.SubmitIntentRequest(intent=submission("local-1", send_at_local=local))
    )
    assert not again.created
    other = intent_pb2.LocalDateTime(date_time=f"{day}T04:30:00", time_zone="Europe/Berlin")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.ingest.SubmitIntent(
            ingest_pb2.SubmitIntentRequest(intent=submission("local-1", send_at_local=other))
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.ingest.SubmitIntent(
            ingest_pb2.SubmitIntentRequest(
                intent=submission(
                    "local-2",
                    send_at_local=intent_pb2.LocalDateTime(
                        date_time=f"{day}T09:00", time_zone="Europe/Bërlin"
                    ),
                )
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err.value)) == {"intent.send_at_local.time_zone"}
