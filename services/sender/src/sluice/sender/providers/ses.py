"""The Amazon SES adapter (``kind = "ses"``), over the SES v2 API with aioboto3.

Each message is one ``SendEmail`` call with raw MIME content (so Reply-To, List-Unsubscribe
and the allow-listed headers travel exactly as built for SMTP), the configuration set,
and message tags carrying the intent id (SES puts them on its delivery, bounce and
complaint events). Calls run ``max_connections`` at a time. ``SendBulkEmail`` is not used:
it sends one stored SES template with per-destination data, whereas Sluice renders each
message itself, so it would save no calls for rendered content. SES counts recipients,
which with one recipient per message equals messages.

Answer -> outcome (the README has the table): a ``MessageId`` accepted; throttling errors
(``Throttling``, ``ThrottlingException``, ``TooManyRequestsException``,
``LimitExceededException``) throttled, and when the message says "Daily message quota
exceeded" throttled for ``QUOTA_PAUSE`` with a paused_until reason (SES's quota is a
rolling 24 hours, so some of it frees up within the hour); ``MessageRejected``,
``BadRequestException`` and other 4xx permanent; ``AccountSuspendedException``,
``SendingPausedException``, ``MailFromDomainNotVerifiedException``, ``NotFoundException``
and credential errors unavailable (the account or its configuration cannot send); 5xx
transient; no connection ``Unavailable``; a read timeout or cut connection unknown.

With ``read_quota``, ``account_limits`` reads the account's ``SendQuota`` (``GetAccount``)
at start-up and lowers the configured sustained rate and daily quota to the account's
``MaxSendRate`` and ``Max24HourSend`` where those are lower (or where none is configured);
it never raises them above what is configured.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from sluice.common.errors import ConfigError, Unavailable
from sluice.common.providers import ProviderConfig, SesSettings
from sluice.sender.providers import mime
from sluice.sender.providers.base import (
    EmailProvider,
    OutboundEmail,
    Plan,
    ProviderResult,
    consecutive,
    planned,
    provider_text,
    quota_results,
    send_in_chunks,
)

if TYPE_CHECKING:
    from types_aiobotocore_sesv2.client import SESV2Client

log = logging.getLogger("sluice.sender.ses")

QUOTA_PAUSE = timedelta(hours=1)
_THROTTLING = {
    "Throttling",
    "ThrottlingException",
    "TooManyRequestsException",
    "LimitExceededException",
}
_UNAVAILABLE = {
    "AccountSuspendedException",
    "SendingPausedException",
    "MailFromDomainNotVerifiedException",
    "NotFoundException",
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "ExpiredTokenException",
}
_TAG_CHARS = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True)
class SendQuota:
    """The account's limits as SES reports them (``GetAccount``)."""

    max_24_hour_send: float
    max_send_rate: float
    sent_last_24_hours: float
    sending_enabled: bool


def _tag(value: str) -> str:
    # SES takes only ASCII letters, digits, '_' and '-' in tag names and values.
    return _TAG_CHARS.sub("_", value)[:256] or "_"


class SesProvider:
    """An ``EmailProvider`` for SES, given an open aioboto3 ``sesv2`` client."""

    def __init__(self, name: str, settings: SesSettings, client: SESV2Client) -> None:
        self._name = name
        self._settings = settings
        self._client = client

    @property
    def name(self) -> str:
        """The configured provider name."""
        return self._name

    @property
    def largest_request(self) -> int:
        """One message a call."""
        return 1

    def plan(self, messages: Sequence[OutboundEmail]) -> Plan:
        """One ``SendEmail`` per message."""
        return consecutive(len(messages), 1)

    async def send_batch(self, messages: Sequence[OutboundEmail]) -> list[ProviderResult]:
        """One ``SendEmail`` per message, ``max_connections`` at a time."""
        return await send_in_chunks(
            planned(messages, self.plan(messages)),
            self._send_chunk,
            concurrency=self._settings.max_connections,
        )

    async def send_quota(self) -> SendQuota:
        """Reads the account's sending quota (``GetAccount``)."""
        try:
            account = await self._client.get_account()
        except (ClientError, BotoCoreError) as exc:
            raise Unavailable(f"ses {self._name}: GetAccount: {exc}") from exc
        quota = account.get("SendQuota", {})
        return SendQuota(
            max_24_hour_send=float(quota.get("Max24HourSend", 0)),
            max_send_rate=float(quota.get("MaxSendRate", 0)),
            sent_last_24_hours=float(quota.get("SentLast24Hours", 0)),
            sending_enabled=bool(account.get("SendingEnabled", True)),
        )

    async def account_limits(self, config: ProviderConfig) -> ProviderConfig:
        """``config`` with the account's limits where they are lower (``read_quota`` on;
        otherwise ``config`` itself). Raises ``Unavailable`` when GetAccount fails."""
        if not self._settings.read_quota:
            return config
        return seeded_limits(config, await self.send_quota())

    async def _send_chunk(self, chunk: Sequence[OutboundEmail]) -> list[ProviderResult]:
        return [await self._send(chunk[0])]

    async def _send(self, message: OutboundEmail) -> ProviderResult:
        try:
            raw = mime.build(message).as_bytes()
        except ValueError as exc:
            return ProviderResult(message.intent_id, "permanent", reason=f"message: {exc}")
        request: dict[str, Any] = {
            "FromEmailAddress": message.from_address,
            "Destination": {"ToAddresses": [mime.ascii_address(message.recipient)]},
            "Content": {"Raw": {"Data": raw}},
            "EmailTags": [{"Name": _tag(k), "Value": _tag(v)} for k, v in message.all_tags()],
        }
        if self._settings.configuration_set:
            request["ConfigurationSetName"] = self._settings.configuration_set
        try:
            answer = await self._client.send_email(**request)
        except ClientError as exc:
            return _refused(message, exc)
        except (EndpointConnectionError, ConnectTimeoutError, NoCredentialsError) as exc:
            raise Unavailable(f"ses {self._name}: {type(exc).__name__}: {exc}") from exc
        except (ReadTimeoutError, ConnectionClosedError) as exc:
            return ProviderResult(message.intent_id, "unknown", reason=f"ses: {exc}")
        except BotoCoreError as exc:
            return ProviderResult(message.intent_id, "unknown", reason=f"ses: {exc}")
        return ProviderResult(
            message.intent_id, "accepted", provider_message_id=answer["MessageId"]
        )


def _refused(message: OutboundEmail, exc: ClientError) -> ProviderResult:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    text = str(error.get("Message", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    reason = f"ses {code}: {provider_text(text)}"
    if code in _THROTTLING:
        if "quota" in text.lower():
            return quota_results([message], reason, datetime.now(UTC) + QUOTA_PAUSE)[0]
        return ProviderResult(message.intent_id, "throttled", reason=reason, retry_after=1.0)
    if code in _UNAVAILABLE:
        return ProviderResult(message.intent_id, "unavailable", reason=reason)
    if status >= 500 or code in ("InternalFailure", "ServiceUnavailable"):
        return ProviderResult(message.intent_id, "transient", reason=reason)
    return ProviderResult(message.intent_id, "permanent", reason=reason)


def client_config(settings: SesSettings) -> AioConfig:
    """No retries inside botocore (the router retries, knowing the outcome), bounded
    timeouts, a connection pool as large as the concurrency."""
    return AioConfig(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=settings.timeout_seconds,
        read_timeout=settings.timeout_seconds,
        max_pool_connections=settings.max_connections,
    )


async def open_adapter(
    config: ProviderConfig, stack: contextlib.AsyncExitStack, resources: Any
) -> EmailProvider:
    """Factory: the aioboto3 session and ``sesv2`` client (closed with ``stack``)."""
    settings = config.settings
    if not isinstance(settings, SesSettings):
        raise ConfigError(f"provider {config.name!r}: not an ses provider")
    where = f"provider {config.name!r}"
    key_id = secret = token = None  # None: the AWS default credential chain
    if settings.access_key_id is not None and settings.secret_access_key is not None:
        key_id = settings.access_key_id.reveal(resources.environ, where)
        secret = settings.secret_access_key.reveal(resources.environ, where)
        if settings.session_token is not None:
            token = settings.session_token.reveal(resources.environ, where)
    session = aioboto3.Session(
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        aws_session_token=token,
        region_name=settings.region,
    )
    client = await stack.enter_async_context(
        session.client(
            "sesv2",
            endpoint_url=settings.endpoint_url or None,
            config=client_config(settings),
        )
    )
    return SesProvider(config.name, settings, client)


def seeded_limits(config: ProviderConfig, quota: SendQuota) -> ProviderConfig:
    """The limits to apply: each of the sustained rate and the daily quota is the lowest of
    what is configured (0 = none) and what the account allows (``MaxSendRate``,
    ``Max24HourSend``; 0 or -1 = nothing said or unlimited); a configured ``burst`` also
    bounds the rate. Logs which figure was used."""
    rate_bounds = [x for x in (config.sustained_rate, float(config.burst)) if x > 0]
    rate = config.sustained_rate
    if quota.max_send_rate > 0 and (not rate_bounds or quota.max_send_rate < min(rate_bounds)):
        rate = quota.max_send_rate
    daily = config.daily_quota
    if quota.max_24_hour_send > 0 and (daily <= 0 or quota.max_24_hour_send < daily):
        daily = max(1, int(quota.max_24_hour_send))  # 0 would mean "no quota"
    lowered = rate != config.sustained_rate or daily != config.daily_quota
    log.log(
        logging.WARNING if lowered else logging.INFO,
        "ses account limits read",
        extra={
            "provider": config.name,
            "sustained_rate": rate,
            "sustained_rate_from": "account MaxSendRate"
            if rate != config.sustained_rate
            else "configuration",
            "daily_quota": daily,
            "daily_quota_from": "account Max24HourSend"
            if daily != config.daily_quota
            else "configuration",
            "account_max_send_rate": quota.max_send_rate,
            "account_max_24_hour_send": quota.max_24_hour_send,
            "account_sending_enabled": quota.sending_enabled,
        },
    )
    return replace(config, sustained_rate=rate, daily_quota=daily)
