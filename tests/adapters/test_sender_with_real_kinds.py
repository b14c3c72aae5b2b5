"""The sender as wired by app.running, with Resend, SendGrid, SMTP and SES providers pointed
at their stand-ins, driven over a real gRPC channel: a providers file naming real kinds
starts, sends and answers per message, and the limits SES's account allows are the ones
applied."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from sluice.common.errors import ConfigError
from sluice.common.telemetry import disabled
from sluice.sender import app
from sluice.sender.providers.base import INTENT_TAG
from sluice.sender.settings import SenderSettings
from sluice.v1 import sender_pb2, sender_pb2_grpc
from tests.conftest import REDIS_URL
from tests.fakes.resend_fake import FakeResend
from tests.fakes.sendgrid_fake import FakeSendGrid
from tests.fakes.ses_fake import REGION, FakeSesErrors
from tests.fakes.smtp_fake import SmtpSink

PROVIDERS = """
[[providers]]
name = "resend"
kind = "resend"
cost_per_thousand = 0.25
intents = ["transactional"]
[providers.settings]
api_key_file = "{key_file}"
base_url = "{resend}"

[[providers]]
name = "sendgrid"
kind = "sendgrid"
cost_per_thousand = 0.2
intents = ["marketing"]
[providers.settings]
api_key = "SG.k"
base_url = "{sendgrid}"

[[providers]]
name = "relay"
kind = "smtp"
cost_per_thousand = 0.0
intents = ["transactional"]
[providers.settings]
host = "127.0.0.1"
port = {smtp}
tls = "none"
"""

TEMPLATE = sender_pb2.TemplateContent(
    id="t",
    version=1,
    subject="Hi {{ name }}",
    html_body="<p>Hi {{ name }}</p>",
    text_body="Hi {{ name }}",
    variables=["name"],
    from_address="Sluice <noreply@sluice.example>",  # .test is refused (special use)
)


def messages(n: int) -> list[sender_pb2.OutboundMessage]:
    return [
        sender_pb2.OutboundMessage(
            intent_id=f"i-{i}",
            recipient=f"u{i}@example.com",
            variables={"name": f"U{i}"},
            idempotency_key=f"k-{i}",
            tags={"campaign": "c"},
            list_unsubscribe_url="https://sluice.test/u",
        )
        for i in range(n)
    ]


async def test_real_kinds_start_and_send(tmp_path: Path, redis_prefix: str) -> None:
    key_file = tmp_path / "resend_key"
    key_file.write_text("re_k\n")
    async with (
        FakeResend(api_key="re_k") as resend,
        FakeSendGrid(api_key="SG.k") as sendgrid,
        SmtpSink() as sink,
    ):
        providers = tmp_path / "providers.toml"
        providers.write_text(
            PROVIDERS.format(
                key_file=key_file, resend=resend.url, sendgrid=sendgrid.url, smtp=sink.port
            )
        )
        settings = SenderSettings(
            redis_url=REDIS_URL, redis_prefix=redis_prefix, providers_file=str(providers)
        )
        async with (
            app.running(settings, disabled(), port=0) as handle,
            grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel,
        ):
            stub = sender_pb2_grpc.SenderServiceStub(channel)
            replies = {
                name: await stub.SendBatch(
                    sender_pb2.SendBatchRequest(
                        provider=name, template=TEMPLATE, messages=messages(3)
                    )
                )
                for name in ("resend", "sendgrid", "relay")
            }
    for name, reply in replies.items():
        assert [r.outcome for r in reply.results] == [sender_pb2.SEND_OUTCOME_ACCEPTED] * 3, name
        assert all(r.provider_message_id for r in reply.results), name
    assert {e["id"] for e in resend.emails} == {
        r.provider_message_id for r in replies["resend"].results
    }
    assert {m["custom_args"][INTENT_TAG] for m in sendgrid.messages} == {"i-0", "i-1", "i-2"}
    assert sorted(r.rcpt_tos[0] for r in sink.received) == [f"u{i}@example.com" for i in range(3)]
    assert replies["relay"].results[0].provider_message_id == "i-0@sluice.example"


async def test_a_missing_secret_stops_the_sender_at_start(
    tmp_path: Path, redis_prefix: str
) -> None:
    providers = tmp_path / "providers.toml"
    providers.write_text(
        PROVIDERS.format(
            key_file=tmp_path / "missing",
            resend="http://127.0.0.1:9",
            sendgrid="http://127.0.0.1:9",
            smtp=9,
        )
    )
    settings = SenderSettings(
        redis_url=REDIS_URL, redis_prefix=redis_prefix, providers_file=str(providers)
    )
    with pytest.raises(ConfigError, match="provider 'resend': api_key: cannot read secret file"):
        async with app.running(settings, disabled(), port=0):
            pass


async def test_ses_account_limits_seed_what_get_capacity_shows(
    tmp_path: Path, redis_prefix: str
) -> None:
    async with FakeSesErrors() as ses:
        ses.quota = {"Max24HourSend": 200.0, "MaxSendRate": 5.0, "SentLast24Hours": 0.0}
        providers = tmp_path / "providers.toml"
        providers.write_text(
            "[[providers]]\n"
            'name = "ses"\nkind = "ses"\ncost_per_thousand = 0.1\nintents = ["marketing"]\n'
            "sustained_rate = 14\nburst = 30\n"
            "[providers.settings]\n"
            f'region = "{REGION}"\nendpoint_url = "{ses.url}"\nread_quota = true\n'
            'access_key_id = "testing"\nsecret_access_key = "testing"\n'
        )
        settings = SenderSettings(
            redis_url=REDIS_URL, redis_prefix=redis_prefix, providers_file=str(providers)
        )
        async with (
            app.running(settings, disabled(), port=0) as handle,
            grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel,
        ):
            reply = await sender_pb2_grpc.SenderServiceStub(channel).GetCapacity(
                sender_pb2.GetCapacityRequest(provider="ses")
            )
    [cap] = reply.providers
    # Configured 14/s with no daily quota; the account allows 5/s and 200 a day.
    assert (cap.sustained_rate, cap.burst, cap.daily_quota) == (5.0, 30, 200)
