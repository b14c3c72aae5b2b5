"""The catalogue against a live ``sluice serve ingest``: every new RPC once with the real
``grpcurl`` (reflection only), then the example clients in Python (a venv holding only
sluice-client) and in Node (@grpc/grpc-js)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sluice.common.auth import new_token, tokens_file_text
from tests.catalogue.catalogue_fixtures import next_berlin_spring_forward
from tests.client.client_venv import client_python
from tests.e2e.e2e_stack import CommandResult, grpcurl, run_command, service_stack

__all__ = ["client_python"]

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NODE_EXAMPLE = ROOT / "examples" / "node"


def auth_env(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """An operator token (admin) and the stack environment that requires it."""
    token = new_token()
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(tokens_file_text({"operator": ("admin",)}, {"operator": token}))
    return token, {"SLUICE_AUTH_TOKENS_FILE": str(tokens_file)}


def ok(result: CommandResult) -> Any:
    assert result.code == 0, str(result)
    return json.loads(result.out) if result.out.strip() else {}


async def test_every_catalogue_rpc_with_grpcurl(
    pg_dsn: str, pg_pool: asyncpg.Pool, redis_prefix: str, tmp_path: Path
) -> None:
    token, env = auth_env(tmp_path)
    async with service_stack(
        database_url=pg_dsn, redis_prefix=redis_prefix, log_dir=tmp_path, **env
    ) as stack:
        target = (await stack.start("ingest")).target
        bearer = f"authorization: Bearer {token}"

        async def rpc(method: str, body: dict[str, Any]) -> Any:
            return ok(
                await grpcurl("-plaintext", "-H", bearer, "-d", json.dumps(body), target, method)
            )

        names = (await grpcurl("-plaintext", target, "list")).out.split()
        assert {"sluice.v1.TemplateService", "sluice.v1.SuppressionService"} <= set(names)

        created = await rpc(
            "sluice.v1.TemplateService/CreateTemplate",
            {
                "templateId": "e2e-welcome",
                "subject": "Hi {{ name }}",
                "htmlBody": "<p>Hi {{ name }}</p>",
                "textBody": "Hi {{ name }}",
                "variables": ["name"],
                "fromAddress": "E2E <e2e@example.com>",
            },
        )
        assert created["created"] is True
        assert created["template"]["version"] == 1
        got = await rpc("sluice.v1.TemplateService/GetTemplate", {"templateId": "e2e-welcome"})
        assert got["template"]["subject"] == "Hi {{ name }}"
        page = await rpc("sluice.v1.TemplateService/ListTemplates", {"pageSize": 10})
        assert [t["id"] for t in page["templates"]] == ["e2e-welcome"]
        preview = await rpc(
            "sluice.v1.TemplateService/PreviewTemplate",
            {"templateId": "e2e-welcome", "variables": {"name": "<Ana>"}},
        )
        assert preview["html"] == "<p>Hi &lt;Ana&gt;</p>"

        added = await rpc(
            "sluice.v1.SuppressionService/AddSuppression",
            {"address": "gone@example.com", "reason": "SUPPRESSION_REASON_HARD_BOUNCE"},
        )
        assert added["created"] is True
        checked = await rpc(
            "sluice.v1.SuppressionService/CheckSuppression", {"addresses": ["gone@example.com"]}
        )
        assert checked["results"][0]["suppressed"] is True
        listed_s = await rpc("sluice.v1.SuppressionService/ListSuppressions", {})
        assert [s["address"] for s in listed_s["suppressions"]] == ["gone@example.com"]

        day = next_berlin_spring_forward()

        def submission(key: str, recipient: str) -> dict[str, Any]:
            return {
                "idempotencyKey": key,
                "campaignId": "e2e-cat",
                "recipient": recipient,
                "intent": "INTENT_MARKETING",
                "templateId": "e2e-welcome",
                "variables": {"name": "Ana"},
                "sendAtLocal": {"dateTime": f"{day}T02:30:00", "timeZone": "Europe/Berlin"},
            }

        suppressed = await rpc(
            "sluice.v1.IngestService/SubmitIntent",
            {"intent": submission("e2e-s", "gone@example.com")},
        )
        assert suppressed["intent"]["status"] == "INTENT_STATUS_SUPPRESSED"
        first = await rpc(
            "sluice.v1.IngestService/SubmitIntent",
            {"intent": submission("e2e-1", "ana@example.com")},
        )
        # grpcurl answers with the proto field names; 02:30 does not exist that day: 03:30 CEST
        assert first["intent"]["send_at"] == f"{day}T01:30:00Z", first
        await rpc(
            "sluice.v1.IngestService/SubmitIntent",
            {"intent": submission("e2e-2", "ana@example.com")},
        )
        by_recipient = await rpc(
            "sluice.v1.IngestService/ListIntents", {"recipient": "ana@EXAMPLE.com"}
        )
        assert sorted(i["idempotency_key"] for i in by_recipient["intents"]) == ["e2e-1", "e2e-2"]
        cancelled = await rpc("sluice.v1.IngestService/CancelIntent", {"id": first["intent"]["id"]})
        assert cancelled["cancelled"] is True
        campaign = await rpc("sluice.v1.IngestService/CancelCampaign", {"campaignId": "e2e-cat"})
        assert campaign == {"cancelled": "1"}  # e2e-2; proto3 JSON drops the zero "leased"
        removed = await rpc(
            "sluice.v1.SuppressionService/RemoveSuppression", {"address": "gone@example.com"}
        )
        assert removed == {"removed": True}

    statuses = {
        r["idempotency_key"]: r["status"]
        for r in await pg_pool.fetch("SELECT idempotency_key, status::text AS status FROM intents")
    }
    assert statuses == {"e2e-s": "suppressed", "e2e-1": "cancelled", "e2e-2": "cancelled"}


def _node_or_skip() -> str:
    node = shutil.which("node")
    ready = node is not None and (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir()
    if not ready:
        if os.environ.get("CI"):
            pytest.fail("CI must install Node and examples/node (see .ci/run setup_node_example)")
        pytest.skip("node or examples/node/node_modules missing: cd examples/node && npm ci")
    assert node is not None
    return node


async def test_example_clients_run_against_a_live_stack(
    pg_dsn: str, redis_prefix: str, tmp_path: Path, client_python: Path
) -> None:
    token, env = auth_env(tmp_path)
    async with service_stack(
        database_url=pg_dsn, redis_prefix=redis_prefix, log_dir=tmp_path, **env
    ) as stack:
        target = (await stack.start("ingest")).target
        example = str(ROOT / "examples" / "python" / "client.py")
        refused = await run_command(str(client_python), example, "--target", target, wait=60)
        assert refused.code == 1, str(refused)
        assert "UNAUTHENTICATED" in refused.err, str(refused)
        py = await run_command(
            str(client_python), example, "--target", target, "--token", token, wait=60
        )
        assert py.code == 0, str(py)
        lines = py.out.splitlines()
        assert lines[0] == "template example-reminder version 1 (new: True)", str(py)
        assert "preview subject: See you tomorrow, Ana" in lines
        assert "suppressed: False" in lines
        assert "found by recipient: True" in lines
        assert lines[-1] == "cancelled: INTENT_STATUS_CANCELLED"

        node = _node_or_skip()
        js = await run_command(
            node, str(NODE_EXAMPLE / "client.js"), "--target", target, "--token", token, wait=60
        )
        assert js.code == 0, str(js)
        lines = js.out.splitlines()
        # the Python run created the template: same content, same version, not new
        assert lines[0] == "template example-reminder version 1 (new: false)", str(js)
        assert "found by recipient: true" in lines
        assert lines[-1] == "cancelled: INTENT_STATUS_CANCELLED"
