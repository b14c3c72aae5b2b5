"""MIME messages for the adapters that send raw mail (SMTP, and SES raw content).

The standard library's ``email`` package writes the headers, so a header value with a
line break is refused (``ValueError``) rather than written: the adapters answer such a
message ``permanent``. Addresses whose domain is not ASCII are sent in IDNA form; a local
part that is not ASCII needs SMTPUTF8 (``needs_smtputf8``).
"""

from __future__ import annotations

import email.policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, parseaddr

from sluice.sender.providers.base import OutboundEmail


def _addr_spec(value: str) -> str:
    return parseaddr(value)[1] or value


def ascii_address(address: str) -> str:
    """``address`` with its domain in IDNA form (the local part as it is)."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    return f"{local}@{domain.encode('idna').decode('ascii')}"


def needs_smtputf8(message: OutboundEmail) -> bool:
    """True when the envelope needs SMTPUTF8: a non-ASCII local part (domains use IDNA)."""
    for address in (message.recipient, _addr_spec(message.from_address)):
        if not ascii_address(address).isascii():
            return True
    return False


def message_id(message: OutboundEmail, domain: str = "") -> str:
    """A Message-ID that stays the same for every attempt at one intent."""
    host = domain or ascii_address(_addr_spec(message.from_address)).rpartition("@")[2]
    return f"<{message.intent_id}@{host or 'sluice.invalid'}>"


def envelope(message: OutboundEmail) -> tuple[str, str]:
    """(MAIL FROM, RCPT TO) addresses."""
    return ascii_address(_addr_spec(message.from_address)), ascii_address(message.recipient)


def build(message: OutboundEmail, *, message_id_domain: str = "") -> EmailMessage:
    """The message with its headers and a text/HTML alternative body.

    Raises ``ValueError`` for a header value that would break the header block.
    """
    utf8 = needs_smtputf8(message)
    msg = EmailMessage(policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP)
    name, spec = parseaddr(message.from_address)
    msg["From"] = _address_header(name, spec) if spec else message.from_address
    msg["To"] = ascii_address(message.recipient)
    msg["Subject"] = message.subject
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = message_id(message, message_id_domain)
    if message.reply_to:
        msg["Reply-To"] = message.reply_to
    for header, value in message.all_headers():
        msg[header] = value
    if message.text:
        msg.set_content(message.text)
        if message.html:
            msg.add_alternative(message.html, subtype="html")
    else:
        msg.set_content(message.html, subtype="html")
    return msg


def _address_header(name: str, spec: str) -> Address | str:
    local, _, domain = ascii_address(spec).rpartition("@")
    try:
        return Address(display_name=name, username=local, domain=domain)
    except (ValueError, IndexError):
        return spec
