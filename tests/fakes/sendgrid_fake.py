"""A local SendGrid: ``POST /v3/mail/send`` as SendGrid's v3 reference documents it.

Written from SendGrid's Mail Send reference and its error list: bearer API key (401);
1 to 1,000 personalizations, each with a ``to`` of valid addresses, at most 1,000
recipients a request, each address once across the request; a ``from`` address; a
subject at the top or in every personalization; ``content`` of typed, non-empty values
with ``text/plain`` first; string ``custom_args`` under 10,000 bytes; no reserved headers
(all 400 with ``errors``); bodies over 30 MB are 413; a per-second request limit with
``X-RateLimit-Limit/Remaining/Reset`` (Unix time) and 429; 202 with ``X-Message-Id``
and no body when queued.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from aiohttp import web

from tests.fakes.http_base import FakeHttpServer

_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")
_RESERVED = {
    "x-sg-id",
    "x-sg-eid",
    "received",
    "dkim-signature",
    "content-type",
    "content-transfer-encoding",
    "to",
    "from",
    "subject",
    "reply-to",
    "cc",
    "bcc",
}
MAX_BODY = 30 * 1024 * 1024


class Refused(Exception):
    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def _email(obj: Any, field: str) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get("email"), str):
        raise Refused("Each email object must at least have an email address", field)
    if not _ADDRESS.match(obj["email"]):
        raise Refused("Does not contain a valid address.", field)
    return obj["email"].lower()


class FakeSendGrid(FakeHttpServer):
    def __init__(self, api_key: str = "SG.test", requests_per_second: int = 0) -> None:
        super().__init__()
        self.api_key = api_key
        self.requests_per_second = requests_per_second
        self.messages: list[dict[str, Any]] = []  # one per personalization queued
        self.app.router.add_post("/v3/mail/send", self._send)

    def _answer(
        self, status: int, headers: dict[str, str], message: str = "", field: str | None = None
    ) -> web.Response:
        if status == 202:
            return web.Response(status=202, headers=headers)
        body = {"errors": [{"message": message, "field": field, "help": None}]}
        return web.json_response(body, status=status, headers=headers)

    async def _send(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": raw})
        allowed, remaining, reset = self.take_window(self.requests_per_second)
        headers = {}
        if self.requests_per_second:
            headers = {
                "X-RateLimit-Limit": str(self.requests_per_second),
                "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": str(round(time.time() + reset)),
            }
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._answer(
                401, headers, "The provided authorization grant is invalid, expired, or revoked"
            )
        if not allowed:
            return self._answer(429, headers, "too many requests")
        if self.status_next:
            return self._answer(self.status_next.pop(0), headers, "injected")
        if len(raw) > MAX_BODY:
            return self._answer(413, headers, "Payload Too Large")
        try:
            document = json.loads(raw)
            queued = self._validate(document)
        except ValueError:
            return self._answer(400, headers, "Bad Request", None)
        except Refused as exc:
            return self._answer(400, headers, exc.message, exc.field)
        message_id = uuid.uuid4().hex[:22]
        for p in queued:
            self.messages.append({**p, "x_message_id": message_id})
        response = self._answer(202, {**headers, "X-Message-Id": message_id})
        return await self.after(request, response)

    def _validate(self, doc: Any) -> list[dict[str, Any]]:
        if not isinstance(doc, dict):
            raise Refused("Bad Request")
        personalizations = doc.get("personalizations")
        if not isinstance(personalizations, list) or not personalizations:
            raise Refused("You must have at least one personalization.", "personalizations")
        if len(personalizations) > 1000:
            raise Refused(
                "The personalization block is limited to 1000 personalizations per API "
                f"request. You have provided {len(personalizations)} personalizations.",
                "personalizations",
            )
        sender = _email(doc.get("from"), "from.email")
        if "reply_to" in doc:
            _email(doc["reply_to"], "reply_to.email")
        content = doc.get("content")
        if not isinstance(content, list) or not content:
            raise Refused(
                "Unless a valid template_id is provided, the content parameter is required.",
                "content",
            )
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") and part.get("value")):
                raise Refused(
                    "The content value must be a string at least one character in length.",
                    f"content.{i}.value",
                )
            if part["type"] == "text/plain" and i != 0:
                raise Refused("If present, text/plain content must be first.", "content")
        seen: set[str] = set()
        total = 0
        queued = []
        for n, p in enumerate(personalizations):
            if not isinstance(p, dict) or not isinstance(p.get("to"), list) or not p["to"]:
                raise Refused(
                    "The to array is required for all personalization objects, and "
                    "must have at least one email object with a valid email address.",
                    f"personalizations.{n}.to",
                )
            for kind in ("to", "cc", "bcc"):
                for address in p.get(kind, []):
                    email = _email(address, f"personalizations.{n}.{kind}")
                    if email in seen:
                        raise Refused(
                            "Each unique email address in the personalizations array "
                            "should only be included once.",
                            f"personalizations.{n}.{kind}",
                        )
                    seen.add(email)
                    total += 1
            if not (p.get("subject") or doc.get("subject")):
                raise Refused(
                    "The subject is required. You can get around this requirement if "
                    "you use a template with a subject defined or if every single "
                    "personalization has a subject defined.",
                    "subject",
                )
            args = p.get("custom_args", {})
            if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
                raise Refused(
                    "Custom args values must be strings.", f"personalizations.{n}.custom_args"
                )
            if len(json.dumps(args).encode()) >= 10000:
                raise Refused(
                    "The custom arguments must be less than 10000 bytes.",
                    f"personalizations.{n}.custom_args",
                )
            headers = p.get("headers", {})
            for name, value in headers.items():
                if name.lower() in _RESERVED or not isinstance(value, str):
                    raise Refused(
                        f"The header {name} is reserved or invalid.",
                        f"personalizations.{n}.headers",
                    )
            queued.append(
                {
                    "to": [a["email"] for a in p["to"]],
                    "subject": p.get("subject") or doc.get("subject"),
                    "headers": headers,
                    "custom_args": args,
                    "from": sender,
                    "reply_to": doc.get("reply_to"),
                    "content": content,
                }
            )
        if total > 1000:
            raise Refused(
                "There is a limit of 1000 total recipients (to + cc + bcc) per request.",
                "personalizations",
            )
        return queued
