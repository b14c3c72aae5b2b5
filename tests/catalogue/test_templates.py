"""TemplateService over real gRPC against real PostgreSQL."""

from __future__ import annotations

import time
import uuid

import asyncpg
import grpc
import pytest

from sluice.cli.seed import DEMO_TEMPLATES, seed_templates
from sluice.common.templates import TemplateCache
from sluice.router import repository as router_repo
from sluice.v1 import ingest_pb2, template_pb2
from tests.catalogue.catalogue_fixtures import Stubs, submission, welcome
from tests.grpc_helpers import field_violations


async def test_versions_are_immutable_and_content_addressed(stubs: Stubs) -> None:
    first = await stubs.templates.CreateTemplate(welcome())
    assert first.created
    assert first.template.version == 1
    assert first.template.HasField("create_time")
    again = await stubs.templates.CreateTemplate(welcome())
    assert not again.created
    assert again.template.version == 1
    second = await stubs.templates.CreateTemplate(welcome(subject="Hello {{ name }}"))
    assert second.created
    assert second.template.version == 2

    v1 = await stubs.templates.GetTemplate(
        template_pb2.GetTemplateRequest(template_id="welcome", version=1)
    )
    assert v1.template.subject == "Hi {{ name }}"
    latest = await stubs.templates.GetTemplate(
        template_pb2.GetTemplateRequest(template_id="welcome")
    )
    assert latest.template.version == 2
    assert latest.template.subject == "Hello {{ name }}"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.templates.GetTemplate(
            template_pb2.GetTemplateRequest(template_id="welcome", version=3)
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_history_cannot_be_rewritten(stubs: Stubs, pg_pool: asyncpg.Pool) -> None:
    await stubs.templates.CreateTemplate(welcome())
    with pytest.raises(asyncpg.exceptions.ReadOnlySQLTransactionError):
        await pg_pool.execute("UPDATE template_versions SET subject = 'x'")


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"html_body": "<p>{% if %}</p>"}, "html_body", "syntax error on line 1"),
        ({"subject": "Hi {{ nmae }}"}, "subject", "'nmae', which is not a declared variable"),
        ({"text_body": "{{ name }"}, "text_body", "syntax error"),
        ({"template_id": "Has Spaces"}, "template_id", "a-z"),
        ({"variables": ["name", "name"]}, "variables[1]", "declared twice"),
        ({"from_address": "not an address"}, "from_address", ""),
        ({"subject": "two\nlines"}, "subject", "one line"),
    ],
)
async def test_a_bad_template_fails_at_creation(
    stubs: Stubs, pg_pool: asyncpg.Pool, overrides: dict[str, object], field: str, fragment: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.templates.CreateTemplate(welcome(**overrides))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err.value)
    assert field in violations, violations
    assert fragment in violations[field]
    assert await pg_pool.fetchval("SELECT count(*) FROM templates") == 0
    assert await pg_pool.fetchval("SELECT count(*) FROM template_versions") == 0


async def test_list_pages_latest_versions_and_one_templates_history(stubs: Stubs) -> None:
    for template_id in ("a-one", "b-two", "c-three"):
        await stubs.templates.CreateTemplate(welcome(template_id=template_id))
    await stubs.templates.CreateTemplate(welcome(template_id="b-two", text_body="v2 {{ name }}"))
    await stubs.templates.CreateTemplate(welcome(template_id="b-two", text_body="v3 {{ name }}"))

    page = await stubs.templates.ListTemplates(template_pb2.ListTemplatesRequest(page_size=2))
    assert [(t.id, t.version) for t in page.templates] == [("a-one", 1), ("b-two", 3)]
    assert page.next_page_token
    rest = await stubs.templates.ListTemplates(
        template_pb2.ListTemplatesRequest(page_size=2, page_token=page.next_page_token)
    )
    assert [(t.id, t.version) for t in rest.templates] == [("c-three", 1)]
    assert rest.next_page_token == ""

    history = await stubs.templates.ListTemplates(
        template_pb2.ListTemplatesRequest(template_id="b-two", page_size=2)
    )
    assert [t.version for t in history.templates] == [3, 2]
    older = await stubs.templates.ListTemplates(
        template_pb2.ListTemplatesRequest(
            template_id="b-two", page_size=2, page_token=history.next_page_token
        )
    )
    assert [t.version for t in older.templates] == [1]
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a token is bound to its filters
        await stubs.templates.ListTemplates(
            template_pb2.ListTemplatesRequest(page_token=history.next_page_token)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_preview_renders_escaped_html_of_the_version_asked(stubs: Stubs) -> None:
    await stubs.templates.CreateTemplate(welcome())
    await stubs.templates.CreateTemplate(welcome(subject="Welcome back, {{ name }}"))
    preview = await stubs.templates.PreviewTemplate(
        template_pb2.PreviewTemplateRequest(
            template_id="welcome", version=1, variables={"name": "<b>Ana</b>"}
        )
    )
    assert preview.version == 1
    assert preview.subject == "Hi <b>Ana</b>"
    assert preview.html == "<p>Hi &lt;b&gt;Ana&lt;/b&gt;</p>"
    assert preview.text == "Hi <b>Ana</b>"


async def test_preview_needs_exactly_the_declared_variables(stubs: Stubs) -> None:
    await stubs.templates.CreateTemplate(welcome())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.templates.PreviewTemplate(
            template_pb2.PreviewTemplateRequest(template_id="welcome", variables={"nmae": "x"})
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err.value)) == {"variables['name']", "variables['nmae']"}


@pytest.mark.parametrize(
    "body",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{{ name * 100000000 }}",
        "{{ '{:999999999}'.format(name) }}",
        "{{ (name * 1000)|replace(name, name * 1000)|replace(name, name * 1000) }}",
    ],
)
async def test_preview_stops_at_its_budget(stubs: Stubs, body: str) -> None:
    # Each of these would hold a core for minutes or take gigabytes if rendered unbounded.
    await stubs.templates.CreateTemplate(welcome(html_body=body))
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.templates.PreviewTemplate(
            template_pb2.PreviewTemplateRequest(template_id="welcome", variables={"name": "ab"})
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "budget" in err.value.details()
    assert time.monotonic() - started < 10  # generous: the budget is 0.5 s


async def test_seeded_templates_get_versions_and_serve_ingest_and_router(
    stubs: Stubs, pg_pool: asyncpg.Pool
) -> None:
    # The demo seed writes the head table directly; the trigger records its versions, and
    # an API-created template is what ingest validates and the router sends.
    await seed_templates(pg_pool)
    listed = await stubs.templates.ListTemplates(template_pb2.ListTemplatesRequest())
    assert {t.id for t in listed.templates} == {t.id for t in DEMO_TEMPLATES}

    created = await stubs.templates.CreateTemplate(welcome(template_id="api-made"))
    sub = submission("t-1", template_id="api-made")
    submitted = await stubs.ingest.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=sub))
    assert submitted.created
    cached = await TemplateCache(pg_pool).get_many(["api-made"])
    assert cached["api-made"].version == created.template.version
    leased = await router_repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=10, lease_seconds=30)
    assert [str(i.id) for i in leased] == [submitted.intent.id]
