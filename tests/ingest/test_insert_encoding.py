"""What ingest hands the INSERT, built the cheap way, equals what the plain way builds."""

from __future__ import annotations

import json
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

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
