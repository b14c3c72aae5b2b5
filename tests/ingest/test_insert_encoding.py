"""What ingest encodes the cheap way (for the INSERT, for its answers) equals what the
plain way builds."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

from google.protobuf import timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.common.model import to_timestamp
from sluice.ingest.repository import _json_text, new_intent_ids

# Any string protobuf can carry (no lone surrogates), control and quote characters included.
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(_text, _text, max_size=5))
def test_json_text_is_what_json_dumps_writes(variables: dict[str, str]) -> None:
    text = _json_text(variables)
    assert text == json.dumps(variables, separators=(",", ":"), ensure_ascii=False)
    assert json.loads(text) == variables


@given(st.integers(min_value=1, max_value=300))
def test_new_intent_ids_are_distinct_version_4_uuids(count: int) -> None:
    ids = new_intent_ids(count)
    assert len(set(ids)) == count
    for intent_id in ids:
        plain = uuid.UUID(str(intent_id))
        assert (intent_id.version, intent_id.variant) == (4, uuid.RFC_4122)
        assert intent_id == plain
        assert hash(intent_id) == hash(plain)


@settings(max_examples=500, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=-11)), UTC]),
    )
)
def test_to_timestamp_is_what_from_datetime_writes(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value.astimezone(UTC))
    assert to_timestamp(value) == expected
