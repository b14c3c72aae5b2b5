"""When an intent may first be sent, and until when: send_at (UTC or local) and deadline.

Local wall-clock times are converted with the IANA database (``zoneinfo``; the ``tzdata``
package supplies it where the system has none). Two wall-clock times need a rule, and the
rule is the one RFC 5545 (iCalendar) and java.time use, which is also Python's ``fold=0``:

- a time that does not exist, inside the hour skipped when clocks go forward (02:30 on the
  last Sunday of March in Europe/Berlin), is moved forward by the length of the gap: it is
  read with the offset in force before the change, so 02:30 becomes 03:30 CEST;
- a time that happens twice, inside the hour repeated when clocks go back (02:30 on the
  last Sunday of October in Europe/Berlin), means the first of the two (02:30 CEST, not
  02:30 CET).

Deadlines that the client does not give are counted from the later of now and send_at, so
a send_at in the past (a clock a little behind, a retried request) gets its full window
instead of expiring on arrival. A send_at more than a day in the past is refused: such a
time (1970, from an unset field) is a client bug, and accepting it used to expire at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sluice.common.model import from_timestamp
from sluice.v1 import intent_pb2

MAX_SCHEDULE_AHEAD = timedelta(days=366)
#: How far in the past a send_at may be (it then means "now").
MAX_SEND_AT_PAST = timedelta(days=1)


class LocalTimeError(ValueError):
    """A local time that cannot be converted; ``field`` is the part that is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def local_to_utc(date_time: str, time_zone: str) -> datetime:
    """The UTC instant of a wall-clock time in an IANA zone, by the module's DST rule.

    Raises LocalTimeError saying which part is wrong.
    """
    if not time_zone:
        raise LocalTimeError("time_zone", "required: an IANA name such as Europe/Berlin")
    try:
        zone = ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise LocalTimeError(
            "time_zone", f"unknown time zone {time_zone!r} (an IANA name such as Europe/Berlin)"
        ) from None
    try:
        wall = datetime.fromisoformat(date_time)
    except ValueError:
        raise LocalTimeError(
            "date_time", f"{date_time!r} is not an ISO 8601 date and time"
        ) from None
    if wall.tzinfo is not None:
        raise LocalTimeError(
            "date_time", "a wall-clock time without an offset (the zone is time_zone)"
        )
    # fold=0: a skipped time takes the offset before the gap (so it moves forward by the
    # gap), a repeated time is its first occurrence.
    return wall.replace(tzinfo=zone, fold=0).astimezone(UTC)


def deadline_window(windows: Mapping[str, timedelta] | timedelta, kind: str | None) -> timedelta:
    """The default deadline window of ``kind`` (the longest one for an unknown kind)."""
    if isinstance(windows, timedelta):
        return windows
    window = windows.get(kind or "")
    return window if window is not None else max(windows.values(), default=timedelta(days=1))


def resolve(
    sub: intent_pb2.IntentSubmission,
    kind: str | None,
    *,
    now: datetime,
    windows: Mapping[str, timedelta] | timedelta,
    bad: Callable[[str, str], None],
) -> tuple[datetime, datetime]:
    """``(send_at, deadline)`` for a submission, reporting bad fields through ``bad``.

    ``windows`` is the default deadline window per intent kind (or one for all). The
    returned values are only meaningful when ``bad`` was not called.
    """
    send_at = now
    if sub.HasField("send_at") and sub.HasField("send_at_local"):
        bad("send_at_local", "give send_at or send_at_local, not both")
    elif sub.HasField("send_at_local"):
        local = sub.send_at_local
        try:
            send_at = local_to_utc(local.date_time, local.time_zone)
        except LocalTimeError as exc:
            bad(f"send_at_local.{exc.field}", str(exc))
    elif sub.HasField("send_at"):
        send_at = from_timestamp(sub.send_at)
    field = "send_at_local" if sub.HasField("send_at_local") else "send_at"
    if send_at > now + MAX_SCHEDULE_AHEAD:
        bad(field, "at most 366 days ahead")
    elif send_at < now - MAX_SEND_AT_PAST:
        bad(field, "more than a day in the past (an unset or epoch time?)")

    window = deadline_window(windows, kind)
    if sub.HasField("deadline"):
        deadline = from_timestamp(sub.deadline)
        if deadline <= now:
            bad("deadline", "is in the past")
        elif deadline <= send_at:
            bad("deadline", "must be after send_at")
    else:
        deadline = max(now, send_at) + window
    return send_at, deadline
