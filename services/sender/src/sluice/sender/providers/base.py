"""The adapter interface every email provider implements (sandbox, SES, Resend, SendGrid,
SMTP), so the sender's servicer never knows which one it is talking to.

Contract of ``EmailProvider.send_batch``:

- It receives already rendered messages, at most the provider's ``max_batch_size``, that
  the rate limiter has already reserved; it does no throttling of its own.
- It returns exactly one ``ProviderResult`` per message, in the order given, with the
  message's ``intent_id``.
- It must not raise for a problem with single messages (a rejected address, content the
  provider refuses, a per-message rate-limit answer): those are results, ``permanent``
  when retrying can never help and ``transient`` (with ``retry_after`` when the provider
  said when) when it may.
- It raises ``sluice.common.errors.Unavailable`` only when nothing was handed to the
  provider (connection refused, name resolution failed, the store the adapter needs is
  down). The servicer answers ``PROVIDER_UNAVAILABLE`` for every message of the batch: the
  router retries them without spending an attempt (an outage must not turn into failures)
  and counts them against the provider's health, so it fails over.
- When the batch may have reached the provider (a timeout after sending, a server error
  for the whole batch), it returns ``transient`` results instead: those are attempts, and
  the idempotency key below keeps a retry of an accepted batch from being delivered twice.
- It passes ``idempotency_key`` to providers that accept one, so a retried send is not
  delivered twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

# "unavailable" is set by the servicer when an adapter raises Unavailable; adapters raise
# rather than return it.
Outcome = Literal["accepted", "transient", "permanent", "unavailable"]


@dataclass(frozen=True, slots=True)
class OutboundEmail:
    """One rendered message ready for a provider."""

    intent_id: str
    recipient: str
    from_address: str
    subject: str
    html: str
    text: str
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class ProviderResult:
    """What the provider did with one message.

    ``accepted`` carries the provider's ``provider_message_id`` (acceptance is not
    delivery: webhooks report that later); failures carry a ``reason``.
    """

    intent_id: str
    outcome: Outcome
    provider_message_id: str = ""
    reason: str = ""
    retry_after: float = 0.0


class EmailProvider(Protocol):
    """An email provider adapter; see the module docstring for the full contract."""

    @property
    def name(self) -> str:
        """The configured provider name (``ProviderConfig.name``)."""
        ...

    async def send_batch(self, messages: Sequence[OutboundEmail]) -> list[ProviderResult]:
        """Sends the messages; one result per message, in order."""
        ...

    async def aclose(self) -> None:
        """Releases connections and clients the adapter owns."""
        ...
