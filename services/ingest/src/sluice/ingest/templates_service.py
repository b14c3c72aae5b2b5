"""TemplateService: immutable template versions, compiled at creation, and bounded previews."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from email.utils import parseaddr

import asyncpg
import grpc
from email_validator import EmailNotValidError, validate_email

from sluice.common.errors import InvalidArgument, NotFound, ResourceExhausted
from sluice.common.model import to_timestamp
from sluice.common.template_engine import (
    RenderBudget,
    RenderBudgetExceeded,
    TemplateRenderError,
    compile_violations,
    render_bounded,
)
from sluice.ingest import page_tokens as paging
from sluice.ingest import templates_repository as repo
from sluice.ingest.settings import IngestSettings
from sluice.ingest.templates_repository import TemplateVersion
from sluice.v1 import template_pb2, template_pb2_grpc

TEMPLATE_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
MAX_SUBJECT = 998  # the longest line RFC 5322 allows in a header
MAX_BODY = 256 * 1024
MAX_VARIABLES = 64
MAX_VARIABLE_NAME = 64


def template_to_proto(t: TemplateVersion) -> template_pb2.Template:
    """The wire form of a template version."""
    msg = template_pb2.Template(
        id=t.id,
        version=t.version,
        subject=t.subject,
        html_body=t.html_body,
        text_body=t.text_body,
        variables=list(t.variables),
        from_address=t.from_address,
    )
    ts = to_timestamp(t.created_at)
    if ts is not None:
        msg.create_time.CopyFrom(ts)
    return msg


def check_create(request: template_pb2.CreateTemplateRequest) -> list[tuple[str, str]]:
    """Every reason the request cannot become a template version (empty when it can)."""
    bad: list[tuple[str, str]] = []
    if not TEMPLATE_ID.fullmatch(request.template_id):
        bad.append(("template_id", "1-128 of a-z, 0-9, '.', '_', '-', starting alphanumeric"))
    if not request.subject.strip():
        bad.append(("subject", "required"))
    elif len(request.subject) > MAX_SUBJECT or any(c in request.subject for c in "\r\n\x00"):
        bad.append(("subject", f"one line of at most {MAX_SUBJECT} characters"))
    if not request.html_body.strip():
        bad.append(("html_body", "required"))
    for field in ("html_body", "text_body"):
        if len(getattr(request, field)) > MAX_BODY:
            bad.append((field, f"at most {MAX_BODY} characters"))
    names = list(request.variables)
    if len(names) > MAX_VARIABLES:
        bad.append(("variables", f"at most {MAX_VARIABLES} variables"))
    for i, name in enumerate(names):
        if not name.isidentifier() or len(name) > MAX_VARIABLE_NAME or name.startswith("_"):
            bad.append((f"variables[{i}]", "an identifier of at most 64 characters, no '_' first"))
        elif names.index(name) != i:
            bad.append((f"variables[{i}]", f"{name!r} is declared twice"))
    _, address = parseaddr(request.from_address)
    if not address:
        bad.append(("from_address", "required, e.g. 'Sluice <noreply@example.com>'"))
    else:
        try:
            validate_email(address, check_deliverability=False, allow_smtputf8=True)
        except EmailNotValidError as exc:
            bad.append(("from_address", str(exc)))
    if not bad:  # compiling is the expensive check: only for an otherwise valid request
        parts = {
            "subject": request.subject,
            "html_body": request.html_body,
            "text_body": request.text_body,
        }
        bad.extend(compile_violations(parts, names))
    return bad


def _invalid(violations: list[tuple[str, str]]) -> InvalidArgument:
    return InvalidArgument(
        "invalid template: " + "; ".join(f"{f}: {d}" for f, d in violations), violations
    )


class TemplateServicer(template_pb2_grpc.TemplateServiceServicer):
    """Creates, reads and previews templates."""

    def __init__(self, pool: asyncpg.Pool, settings: IngestSettings) -> None:
        self._pool = pool
        self._budget = RenderBudget(
            seconds=settings.preview_timeout_seconds, max_chars=settings.preview_max_chars
        )
        # Previews run on their own threads, so a slow one never holds the event loop, and
        # at most this many at once: past that callers are told to come back. The pool needs
        # no shutdown: its idle threads exit when the servicer is released, and a render in
        # flight ends within its budget.
        self._workers = settings.preview_concurrency
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="preview")
        self._slots = asyncio.Semaphore(self._workers)

    async def CreateTemplate(
        self, request: template_pb2.CreateTemplateRequest, context: grpc.aio.ServicerContext
    ) -> template_pb2.CreateTemplateResponse:
        violations = check_create(request)
        if violations:
            raise _invalid(violations)
        version, created = await repo.create_version(
            self._pool,
            template_id=request.template_id,
            subject=request.subject,
            html_body=request.html_body,
            text_body=request.text_body,
            variables=tuple(request.variables),
            from_address=request.from_address,
        )
        return template_pb2.CreateTemplateResponse(
            template=template_to_proto(version), created=created
        )

    async def _version(self, template_id: str, version: int) -> TemplateVersion:
        if not template_id:
            raise InvalidArgument("template_id is required", [("template_id", "required")])
        if version < 0:
            raise InvalidArgument("version is negative", [("version", "0 (latest) or more")])
        found = await repo.get_version(self._pool, template_id, version or None)
        if found is None:
            which = f"version {version}" if version else "any version"
            raise NotFound(f"template {template_id!r} has no {which}")
        return found

    async def GetTemplate(
        self, request: template_pb2.GetTemplateRequest, context: grpc.aio.ServicerContext
    ) -> template_pb2.GetTemplateResponse:
        found = await self._version(request.template_id, request.version)
        return template_pb2.GetTemplateResponse(template=template_to_proto(found))

    async def ListTemplates(
        self, request: template_pb2.ListTemplatesRequest, context: grpc.aio.ServicerContext
    ) -> template_pb2.ListTemplatesResponse:
        size = paging.page_size(request.page_size)
        filters = paging.fingerprint("templates", request.template_id)
        position = paging.decode(request.page_token, filters) if request.page_token else None
        if request.template_id:
            before = int(position[0]) if position else 2**31 - 1
            rows = await repo.list_versions(
                self._pool, request.template_id, limit=size + 1, before_version=before
            )
        else:
            after = str(position[0]) if position else ""
            rows = await repo.list_latest(self._pool, limit=size + 1, after_id=after)
        page = rows[:size]
        token = ""
        if len(rows) > size:
            last = page[-1]
            token = paging.encode([last.version if request.template_id else last.id], filters)
        return template_pb2.ListTemplatesResponse(
            templates=[template_to_proto(t) for t in page], next_page_token=token
        )

    async def PreviewTemplate(
        self, request: template_pb2.PreviewTemplateRequest, context: grpc.aio.ServicerContext
    ) -> template_pb2.PreviewTemplateResponse:
        found = await self._version(request.template_id, request.version)
        given = dict(request.variables)
        bad = [
            (f"variables[{name!r}]", f"required by template {found.id!r}")
            for name in found.variables
            if name not in given
        ] + [
            (f"variables[{name!r}]", f"not declared by template {found.id!r}")
            for name in sorted(given.keys() - set(found.variables))
        ]
        if bad:
            raise _invalid(bad)
        parts = {
            "subject": found.subject,
            "html_body": found.html_body,
            "text_body": found.text_body,
        }
        # Wait for a render thread at most one render's budget, then shed: a queue of
        # previews must not grow without bound behind slow templates.
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self._budget.seconds)
        except TimeoutError:
            raise ResourceExhausted(
                f"{self._workers} previews are rendering; try again shortly",
                retry_after=self._budget.seconds,
            ) from None
        try:
            loop = asyncio.get_running_loop()
            rendered = await loop.run_in_executor(
                self._executor, render_bounded, parts, given, self._budget
            )
        except RenderBudgetExceeded as exc:
            raise InvalidArgument(
                f"template exceeds the render budget: {exc}",
                [("variables", f"rendering exceeds the budget: {exc}")],
            ) from None
        except TemplateRenderError as exc:
            raise InvalidArgument(
                f"template does not render: {exc}", [("variables", str(exc))]
            ) from None
        finally:
            self._slots.release()
        return template_pb2.PreviewTemplateResponse(
            version=found.version, subject=rendered.subject, html=rendered.html, text=rendered.text
        )
