"""Messages the adapter tests send."""

from __future__ import annotations

from sluice.sender.providers.base import OutboundEmail


def email(
    intent_id: str,
    recipient: str = "ada@example.com",
    *,
    html: str = "<p>Hello</p>",
    subject: str = "Hello",
    **extra: object,
) -> OutboundEmail:
    return OutboundEmail(
        intent_id=intent_id,
        recipient=recipient,
        from_address="Sluice <noreply@sluice.test>",
        subject=subject,
        html=html,
        text="Hello",
        idempotency_key=f"key-{intent_id}",
        **extra,  # type: ignore[arg-type]
    )
