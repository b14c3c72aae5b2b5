"""The trio as an operator meets it: three ``sluice serve`` processes, driven with the real
``grpcurl`` binary (no proto files: everything comes from server reflection)."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from sluice.common.auth import new_token, tokens_file_text
from sluice.sender.providers.sandbox import SandboxLedger
from tests.conftest import InsertTemplate
from tests.e2e.e2e_stack import GRPCURL, CommandResult, Stack, grpcurl, service_stack

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
PROVIDER = "e2e"  # the unlimited sandbox of e2e_stack.UNLIMITED_PROVIDERS
SENT = "INTENT_STATUS_SENT"
WAIT_SENT_SECONDS = 30.0

# service -> (full name, the RPCs `describe` must show)
SERVICE_RPCS = {
    "ingest": (
        "sluice.v1.IngestService",
        ("SubmitIntent", "SubmitIntents", "SubmitIntentStream", "GetIntent", "ListIntents"),
    ),
    "router": (
        "sluice.v1.RouterService",
        ("GetQueueStats", "ListProviders", "PauseProvider", "ResumeProvider", "RetryFailed"),
    ),
    "sender": ("sluice.v1.SenderService", ("SendBatch", "GetCapacity")),
}


async def start_trio(stack: Stack) -> dict[str, str]:
    """Ingest and sender, then the router pointed at that sender; service -> address."""
    ingest, sender = await asyncio.gather(stack.start("ingest"), stack.start("sender"))
    router = await stack.start("router", SLUICE_SENDER_TARGET=sender.target)
    return {"ingest": ingest.target, "router": router.target, "sender": sender.target}


def ok_json(result: CommandResult) -> Any:
    """grpcurl's JSON answer, after checking it exited 0."""
    assert result.code == 0, str(result)
    return json.loads(result.out)


async def test_grpcurl_lists_describes_checks_health_and_sends(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    redis_prefix: str,
    redis_client: aioredis.Redis,
    insert_template: InsertTemplate,
    tmp_path: Path,
) -> None:
    await insert_template("welcome")
    count = 25
    campaign = f"e2e-{uuid.uuid4().hex[:8]}"
    async with service_stack(
        database_url=pg_dsn, redis_prefix=redis_prefix, log_dir=tmp_path
    ) as stack:
        targets = await start_trio(stack)

        for service, (full_name, rpcs) in SERVICE_RPCS.items():
            target = targets[service]
            listed = await grpcurl("-plaintext", target, "list")
            assert listed.code == 0, str(listed)
            names = set(listed.out.split())
            assert full_name in names, str(listed)
            assert "grpc.health.v1.Health" in names, str(listed)
            assert any(n.startswith("grpc.reflection.") for n in names), str(listed)

            described = await grpcurl("-plaintext", target, "describe", full_name)
            assert described.code == 0, str(described)
            assert f"{full_name} is a service" in described.out
            for rpc in rpcs:
                assert f"rpc {rpc} (" in described.out, str(described)

            for health_service in ("", full_name):
                answer = ok_json(
                    await grpcurl(
                        "-plaintext",
                        "-d",
                        json.dumps({"service": health_service}),
                        target,
                        "grpc.health.v1.Health/Check",
                    )
                )
                assert answer == {"status": "SERVING"}, (service, health_service, answer)

        # Submit with grpcurl, in proto3 JSON (lowerCamelCase names, enum value names).
        submission = {
            "intents": [
                {
                    "idempotencyKey": f"{campaign}-{i}",
                    "campaignId": campaign,
                    "recipient": f"user{i}@example.com",
                    "intent": "INTENT_MARKETING",
                    "templateId": "welcome",
                    "variables": {"name": f"User {i}"},
                }
                for i in range(count)
            ]
        }
        answer = ok_json(
            await grpcurl(
                "-plaintext",
                "-d",
                json.dumps(submission),
                targets["ingest"],
                "sluice.v1.IngestService/SubmitIntents",
            )
        )
        results = answer["results"]
        assert len(results) == count
        assert all(r.get("created") is True and "error" not in r for r in results), results
        ids = [r["intent_id"] for r in results]
        assert len(set(ids)) == count

        # Poll with grpcurl until the router and sender have sent every one.
        listing = {"campaignId": campaign, "pageSize": 100}
        deadline = time.monotonic() + WAIT_SENT_SECONDS
        while True:
            page = ok_json(
                await grpcurl(
                    "-plaintext",
                    "-d",
                    json.dumps(listing),
                    targets["ingest"],
                    "sluice.v1.IngestService/ListIntents",
                )
            )
            intents = page.get("intents", [])
            if len(intents) == count and all(i["status"] == SENT for i in intents):
                break
            assert time.monotonic() < deadline, f"not all sent after {WAIT_SENT_SECONDS} s: {page}"
            await asyncio.sleep(0.3)
        assert {i["id"] for i in intents} == set(ids)
        message_ids = [i.get("provider_message_id", "") for i in intents]
        assert all(m.startswith("sandbox-") for m in message_ids), message_ids
        assert len(set(message_ids)) == count
        assert {i["provider"] for i in intents} == {PROVIDER}

        one = ok_json(
            await grpcurl(
                "-plaintext",
                "-d",
                json.dumps({"id": ids[0]}),
                targets["ingest"],
                "sluice.v1.IngestService/GetIntent",
            )
        )["intent"]
        assert one["status"] == SENT
        assert one["attempts"] == 1
        assert one["provider_message_id"] in message_ids

    # The sandbox's own record (written by the sender process) agrees: exactly these, once.
    ledger = SandboxLedger(redis_client, redis_prefix)
    assert await ledger.sent_count(PROVIDER) == count
    sent_ids = await ledger.sent_ids(PROVIDER)
    assert sorted(sent_ids) == sorted(ids)
    assert sum(n for _, n in await ledger.send_log(PROVIDER)) == count
    rows = await pg_pool.fetch(
        "SELECT status::text, provider_message_id, attempts FROM intents WHERE campaign_id = $1",
        campaign,
    )
    assert len(rows) == count
    assert all(r["status"] == "sent" and r["attempts"] == 1 for r in rows)
    assert sorted(r["provider_message_id"] for r in rows) == sorted(message_ids)


async def test_grpcurl_shows_invalid_argument_with_the_field_violation(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    redis_prefix: str,
    insert_template: InsertTemplate,
    tmp_path: Path,
) -> None:
    await insert_template("welcome")
    bad = {
        "intent": {
            "idempotencyKey": "e2e-bad-recipient",
            "recipient": "not-an-address",
            "intent": "INTENT_MARKETING",
            "templateId": "welcome",
            "variables": {"name": "x"},
        }
    }
    async with service_stack(
        database_url=pg_dsn, redis_prefix=redis_prefix, log_dir=tmp_path
    ) as stack:
        ingest = await stack.start("ingest")
        shown = await grpcurl(
            "-plaintext",
            "-d",
            json.dumps(bad),
            ingest.target,
            "sluice.v1.IngestService/SubmitIntent",
        )
        as_json = await grpcurl(
            "-plaintext",
            "-format-error",
            "-d",
            json.dumps(bad),
            ingest.target,
            "sluice.v1.IngestService/SubmitIntent",
        )
    # grpcurl exits 64 + the status code: INVALID_ARGUMENT is 3.
    assert shown.code == 64 + 3, str(shown)
    assert "Code: InvalidArgument" in shown.err, str(shown)
    assert "google.rpc.BadRequest" in shown.err, str(shown)
    assert '"field":"intent.recipient"' in shown.err.replace(" ", ""), str(shown)

    assert as_json.code == 64 + 3, str(as_json)
    status = json.loads(as_json.err)
    assert status["code"] == 3
    bad_requests = [d for d in status["details"] if d["@type"].endswith("/google.rpc.BadRequest")]
    assert len(bad_requests) == 1, status
    violations = bad_requests[0]["field_violations"]
    assert [v["field"] for v in violations] == ["intent.recipient"]
    assert violations[0]["description"]

    # Nothing half-written (promise 7).
    assert await pg_pool.fetchval("SELECT count(*) FROM intents") == 0


async def test_grpcurl_streams_a_campaign_in_chunks(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    redis_prefix: str,
    insert_template: InsertTemplate,
    tmp_path: Path,
) -> None:
    """SubmitIntentStream with the real grpcurl: several request messages on one stream
    (concatenated JSON), one answer per chunk, in order; keys derived from campaign and run."""
    await insert_template("welcome")

    def chunk(n: int, run: str) -> dict[str, Any]:
        return {
            "chunk": n,
            "intents": [
                {
                    "campaignId": "e2e-weekly",
                    "run": run,
                    "recipient": f"user{n}-{i}@example.com",
                    "intent": "INTENT_MARKETING",
                    "templateId": "welcome",
                    "variables": {"name": f"User {i}"},
                }
                for i in range(3)
            ]
            + [{"campaignId": "e2e-weekly", "recipient": "nope", "templateId": "welcome"}],
        }

    body = " ".join(json.dumps(chunk(n, "2026-W49")) for n in (1, 2))
    async with service_stack(
        database_url=pg_dsn, redis_prefix=redis_prefix, log_dir=tmp_path
    ) as stack:
        ingest = await stack.start("ingest")
        args = (
            "-plaintext",
            "-d",
            body,
            ingest.target,
            "sluice.v1.IngestService/SubmitIntentStream",
        )
        first = await grpcurl(*args)
        again = await grpcurl(*args)  # a retry of this week's run: duplicates only
    assert first.code == 0, str(first)
    replies = [json.loads(m) for m in re.split(r"(?<=\})\s*(?=\{)", first.out.strip())]
    assert [r["chunk"] for r in replies] == ["1", "2"]
    assert [(r.get("created"), r.get("rejected")) for r in replies] == [(3, 1), (3, 1)]
    outcomes = [res["outcome"] for res in replies[0]["results"]]
    assert outcomes == ["SUBMIT_OUTCOME_CREATED"] * 3 + ["SUBMIT_OUTCOME_REJECTED"]
    assert replies[0]["results"][3]["error"]["reason"] == "RECIPIENT_INVALID"
    assert again.code == 0, str(again)
    retried = [json.loads(m) for m in re.split(r"(?<=\})\s*(?=\{)", again.out.strip())]
    assert [r.get("duplicates") for r in retried] == [3, 3]
    assert await pg_pool.fetchval("SELECT count(*) FROM intents") == 6


# --- the README's grpcurl examples, run as written ----------------------------------------

_FENCE = re.compile(r"^```console[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
DEFAULT_PORTS = {"50051": "ingest", "50052": "router", "50053": "sender"}
# The host stays as written (localhost must reach a server bound to 127.0.0.1); only the
# port changes.
_ADDRESS = re.compile(r"\b(localhost|127\.0\.0\.1):(5005[123])\b")


def _complete(command: str) -> bool:
    """True when ``command`` has no open quote (shlex can split it)."""
    try:
        shlex.split(command)
    except ValueError:
        return False
    return True


def readme_grpcurl_commands(markdown: str) -> list[str]:
    """Every ``$ grpcurl ...`` command in the ```` ```console ```` blocks of ``markdown``, in
    order, with backslash-newline continuations joined and quoted multi-line JSON kept."""
    commands = []
    for block in _FENCE.findall(markdown):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line.startswith("$ grpcurl"):
                continue
            command = line[2:]
            while i < len(lines):
                if command.endswith("\\"):
                    command = command[:-1].rstrip() + " " + lines[i].strip()
                elif not _complete(command):
                    command += "\n" + lines[i]
                else:
                    break
                i += 1
            commands.append(command)
    return commands


def localize(command: str, ports: dict[str, int], token: str = "") -> list[str]:
    """``command``'s argv with the default ports replaced by this test's services', the
    ``grpcurl`` of this environment, and ``$SLUICE_TOKEN`` expanded as the shell would; a
    trailing shell pipe (``| jq``) is dropped."""
    command = _ADDRESS.sub(lambda m: f"{m.group(1)}:{ports[DEFAULT_PORTS[m.group(2)]]}", command)
    command = command.replace("$SLUICE_TOKEN", token)
    argv = shlex.split(command)
    if "|" in argv:
        argv = argv[: argv.index("|")]
    assert argv[0] == "grpcurl", argv
    return [GRPCURL, *argv[1:]]


def test_readme_parser_joins_continuations_and_multiline_json() -> None:
    """The extractor itself, on a README-like text (so it is tested before README exists)."""
    sample = (
        "Intro\n\n```console\n"
        "$ grpcurl -plaintext localhost:50051 list\n"
        "grpc.health.v1.Health\n"
        "$ grpcurl -plaintext \\\n"
        '    -d \'{"id": "x"}\' \\\n'
        "    localhost:50051 sluice.v1.IngestService/GetIntent\n"
        "$ grpcurl -plaintext -d '{\n"
        '  "provider": "ses"\n'
        "}' 127.0.0.1:50053 sluice.v1.SenderService/GetCapacity | jq .\n"
        "{}\n```\n\n```bash\n$ grpcurl not-this-one\n```\n"
    )
    commands = readme_grpcurl_commands(sample)
    assert len(commands) == 3
    ports = {"ingest": 1, "router": 2, "sender": 3}
    assert localize(commands[0], ports) == [GRPCURL, "-plaintext", "localhost:1", "list"]
    assert localize(commands[1], ports) == [
        GRPCURL,
        "-plaintext",
        "-d",
        '{"id": "x"}',
        "localhost:1",
        "sluice.v1.IngestService/GetIntent",
    ]
    assert localize(commands[2], ports) == [
        GRPCURL,
        "-plaintext",
        "-d",
        '{\n  "provider": "ses"\n}',
        "127.0.0.1:3",
        "sluice.v1.SenderService/GetCapacity",
    ]


async def test_readme_grpcurl_examples_work_as_written(
    pg_dsn: str, pg_pool: asyncpg.Pool, redis_prefix: str, tmp_path: Path
) -> None:
    if not README.exists():
        pytest.skip("README.md is not written yet (the lead adds it with the grpcurl examples)")
    commands = readme_grpcurl_commands(README.read_text(encoding="utf-8"))
    assert commands, "README.md has no `$ grpcurl` lines in a ```console block"

    from sluice.cli.seed import seed_templates

    # As the README's reader has it: the development providers and the demo templates.
    await seed_templates(pg_pool)
    # As `sluice dev` runs it: auth on, an operator token, the router's own send token.
    tokens = {"operator": new_token(), "router": new_token()}
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(
        tokens_file_text({"operator": ("submit", "read", "admin"), "router": ("send",)}, tokens)
    )
    router_token = tmp_path / "router.token"
    router_token.write_text(tokens["router"])
    async with service_stack(
        database_url=pg_dsn,
        redis_prefix=redis_prefix,
        log_dir=tmp_path,
        providers_toml=None,
        SLUICE_AUTH_TOKENS_FILE=str(tokens_file),
        SLUICE_SENDER_TOKEN_FILE=str(router_token),
    ) as stack:
        targets = await start_trio(stack)
        ports = {service: int(target.rpartition(":")[2]) for service, target in targets.items()}
        failures = []
        for command in commands:
            result = await grpcurl(*localize(command, ports, tokens["operator"])[1:])
            if result.code != 0:
                failures.append(f"$ {command}\n{result}")
            if "$SLUICE_TOKEN" in command:
                refused = await grpcurl(*localize(command, ports, "slc_wrong")[1:])
                if refused.code == 0 or "Unauthenticated" not in refused.err:
                    failures.append(f"$ {command}\nwas not refused with a wrong token:\n{refused}")
    assert not failures, "README grpcurl examples that fail:\n\n" + "\n\n".join(failures)
