"""Stand-ins for SES v2: moto's server on loopback (what SES accepts and records), and
a small server answering SES v2's error shapes that moto cannot produce (throttling, the
daily quota, a suspended account, server errors), both reached by aioboto3 over HTTP.

SES v2 is a REST-JSON API: ``POST /v2/email/outbound-emails`` answers ``{"MessageId"}``;
an error is its HTTP status, an ``x-amzn-ErrorType`` header naming the error and a JSON
``{"message"}`` body. ``GET /v2/email/account`` answers the account with ``SendQuota``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web
from moto.server import ThreadedMotoServer

from tests.fakes.http_base import FakeHttpServer

REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's default account


@contextmanager
def moto_server() -> Iterator[str]:
    """moto in server mode on a free loopback port; yields its URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def moto_sent_messages() -> list[Any]:
    """What moto's SES recorded as sent (the server runs in this process)."""
    from moto.ses.models import ses_backends

    return list(ses_backends[ACCOUNT][REGION].sent_messages)


class FakeSesErrors(FakeHttpServer):
    def __init__(self) -> None:
        super().__init__()
        self.answers: list[tuple[int, str, str]] = []  # (status, error type, message)
        self.quota = {"Max24HourSend": 50000.0, "MaxSendRate": 14.0, "SentLast24Hours": 10.0}
        self.account_reads = 0
        self.app.router.add_post("/v2/email/outbound-emails", self._send)
        self.app.router.add_get("/v2/email/account", self._account)

    async def _send(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
        if self.answers:
            status, error, message = self.answers.pop(0)
            return web.json_response(
                {"message": message}, status=status, headers={"x-amzn-ErrorType": error}
            )
        return await self.after(request, web.json_response({"MessageId": str(uuid.uuid4())}))

    async def _account(self, request: web.Request) -> web.StreamResponse:
        self.account_reads += 1
        return web.json_response({"SendQuota": self.quota, "SendingEnabled": True})
