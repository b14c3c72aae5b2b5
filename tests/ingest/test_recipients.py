"""Recipient checks: the corpus the seed's ASCII regex refused, and the fast path proven
equal to email-validator in strict mode."""

from __future__ import annotations

import re

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.common.addresses import RecipientError, check_recipient

# The kind of pattern the seed used: ASCII letters, digits and a few symbols only.
NAIVE = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")

# Valid internationalised addresses (EAI local parts, IDN domains), with the form Sluice
# stores them in (NFC, domain lower-cased / IDNA-normalised) and whether they need SMTPUTF8.
INTERNATIONAL = [
    ("josé@exämple.com", "josé@exämple.com", True),
    ("用户@例子.广告", "用户@例子.广告", True),
    ("θσερ@εχαμπλε.ψομ", "θσερ@εχαμπλε.ψομ", True),
    ("अजय@डाटा.भारत", "अजय@डाटा.भारत", True),
    ("чебурашка@ящик-с-апельсинами.рф", "чебурашка@ящик-с-апельсинами.рф", True),  # noqa: RUF001  (Cyrillic on purpose)
    ("ok@BÜCHER.example", "ok@bücher.example", False),
    ("user@münchen.de", "user@münchen.de", False),
    ("o'brien@example.com", "o'brien@example.com", False),
    ("x{y}@example.com", "x{y}@example.com", False),
    ("Jose\u0301@example.com", "José@example.com", True),  # NFC-normalised
]

REFUSED = [
    "Alice <alice@example.com>",  # display name
    "a" * 65 + "@example.com",  # RFC 5321 local part limit
    "a@" + ("b" * 63 + ".") * 4 + "com",  # over-length address
    "alice@localhost",  # special-use
    "alice@example.test",
    "alice@x.onion",
    "ali\u202ece@example.com",  # bidi override
    "alice\u200f@example.com",
    "alice\r\n@example.com",
    '"quoted"@example.com',
    "alice@[127.0.0.1]",
    "alice@example..com",
    ".alice@example.com",
]


@pytest.mark.parametrize(("address", "normal", "smtputf8"), INTERNATIONAL)
def test_international_addresses_the_naive_regex_refused_are_accepted(
    address: str, normal: str, smtputf8: bool
) -> None:
    checked = check_recipient(address)
    assert checked.address == normal
    assert checked.smtputf8 is smtputf8


def test_the_corpus_shows_what_the_naive_regex_lost() -> None:
    lost = [a for a, _, _ in INTERNATIONAL if not NAIVE.match(a)]
    assert len(lost) >= 8
    assert all(check_recipient(a) for a in lost)


@pytest.mark.parametrize("address", REFUSED)
def test_refused_addresses(address: str) -> None:
    with pytest.raises(RecipientError):
        check_recipient(address)


def _reference(address: str) -> str | None:
    try:
        return str(
            validate_email(
                address,
                check_deliverability=False,
                allow_smtputf8=True,
                allow_display_name=False,
                allow_quoted_local=False,
                allow_domain_literal=False,
                strict=True,
            ).normalized
        )
    except EmailNotValidError:
        return None


_ASCII = st.sampled_from("abcXYZ019.-_+!#$%&'*/=?^`{|}~@ \"[]\\")
_LABEL = st.text(st.sampled_from("abcZ09-"), min_size=1, max_size=70)


@settings(max_examples=600, deadline=None)
@given(
    local=st.one_of(st.text(_ASCII, max_size=70), st.text(max_size=10)),
    labels=st.lists(
        st.one_of(_LABEL, st.sampled_from(["test", "localhost", "com", "COM"])),
        min_size=1,
        max_size=5,
    ),
)
def test_fast_path_agrees_with_email_validator(local: str, labels: list[str]) -> None:
    address = f"{local}@{'.'.join(labels)}"
    expected = _reference(address)
    try:
        got: str | None = check_recipient(address).address
    except RecipientError:
        got = None
    assert got == expected
