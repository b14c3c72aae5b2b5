"""``python -m bench.sender``: SendBatch messages/s from one sender process, per adapter.

Method: one ``sluice serve sender`` subprocess with three unlimited providers: the
sandbox (no network), the local Resend fake (the adapter sends ``/emails/batch`` of 100)
and the local SendGrid fake (the adapter packs personalizations, up to 1,000 a request);
the fakes run in this process on loopback. Each run sends ``--count`` messages as
``SendBatch`` requests of 500, 4 in flight, and is timed from the first request to the
last answer; every message must come back accepted. The table gives the median of
``--runs`` runs per provider, and each provider's ratio to the sandbox measured in the
same process (the sandbox is the baseline: rendering and gRPC, no provider I/O), and the
sender process's CPU per 1,000 messages (the fakes' CPU is this process's, not counted).
The template's body is the same for every recipient (only the subject varies), so
SendGrid can pack; that is its best case, and said so in the table.

Uses REDIS_URL (default redis://127.0.0.1:6379/0): the sender needs Redis at start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from bench.e2e import Service
from sluice.v1 import sender_pb2, sender_pb2_grpc
from tests.fakes.resend_fake import FakeResend
from tests.fakes.sendgrid_fake import FakeSendGrid

BATCH = 500
IN_FLIGHT = 4
PROVIDERS = ("sandbox", "resend", "sendgrid")
TEMPLATE = sender_pb2.TemplateContent(
    id="bench",
    version=1,
    subject="Hello {{ name }}",
    html_body="<p>Your weekly digest is ready.</p>",
    text_body="Your weekly digest is ready.",
    variables=["name"],
    # not .test: the sender refuses special-use domains
    from_address="Sluice <noreply@example.com>",
)

PROVIDERS_TOML = """
[[providers]]
name = "sandbox"
kind = "sandbox"
cost_per_thousand = 0.0
intents = ["transactional", "marketing", "digest"]
max_batch_size = {batch}
[providers.settings]
record_ids = false

[[providers]]
name = "resend"
kind = "resend"
cost_per_thousand = 0.0
intents = ["transactional", "marketing", "digest"]
max_batch_size = {batch}
[providers.settings]
api_key_env = "BENCH_RESEND_KEY"
base_url = "{resend}"

[[providers]]
name = "sendgrid"
kind = "sendgrid"
cost_per_thousand = 0.0
intents = ["transactional", "marketing", "digest"]
max_batch_size = {batch}
[providers.settings]
api_key_env = "BENCH_SENDGRID_KEY"
base_url = "{sendgrid}"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one_run(stub: sender_pb2_grpc.SenderServiceStub, provider: str, count: int) -> float:
    """Messages per second for ``count`` messages through ``provider``."""
    run = uuid.uuid4().hex[:8]
    requests = [
        sender_pb2.SendBatchRequest(
            provider=provider,
            template=TEMPLATE,
            messages=[
                sender_pb2.OutboundMessage(
                    intent_id=f"{run}-{start + i}",
                    recipient=f"user{start + i}@example.com",
                    variables={"name": f"User {start + i}"},
                    idempotency_key=f"{run}-{start + i}",
                )
                for i in range(min(BATCH, count - start))
            ],
        )
        for start in range(0, count, BATCH)
    ]
    gate = asyncio.Semaphore(IN_FLIGHT)
    accepted = 0

    async def send(request: sender_pb2.SendBatchRequest) -> None:
        nonlocal accepted
        async with gate:
            reply = await stub.SendBatch(request, timeout=120)
        accepted += sum(r.outcome == sender_pb2.SEND_OUTCOME_ACCEPTED for r in reply.results)

    start = time.perf_counter()
    await asyncio.gather(*(send(r) for r in requests))
    elapsed = time.perf_counter() - start
    if accepted != count:
        raise RuntimeError(f"{provider}: {accepted} of {count} accepted")
    return count / elapsed


async def measure(count: int, runs: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(messages/s, sender CPU ms per 1,000 messages) per provider; runs are interleaved,
    so drift on a shared machine hits every provider alike."""
    results: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    cpu: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        async with AsyncExitStack() as stack:
            resend = await stack.enter_async_context(FakeResend(api_key="re_bench"))
            sendgrid = await stack.enter_async_context(FakeSendGrid(api_key="SG.bench"))
            providers = workdir / "providers.toml"
            providers.write_text(
                PROVIDERS_TOML.format(batch=BATCH, resend=resend.url, sendgrid=sendgrid.url)
            )
            port = _free_port()
            env = {
                **os.environ,
                "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                "SLUICE_REDIS_PREFIX": f"bench-sender-{uuid.uuid4().hex[:8]}",
                "SLUICE_PROVIDERS_FILE": str(providers),
                "SLUICE_LISTEN_HOST": "127.0.0.1",
                "SLUICE_SENDER_PORT": str(port),
                "SLUICE_LOG_LEVEL": "WARNING",
                "BENCH_RESEND_KEY": "re_bench",
                "BENCH_SENDGRID_KEY": "SG.bench",
            }
            sender = Service("sender", env, workdir)
            await sender.start()
            stack.push_async_callback(sender.stop)
            target = f"127.0.0.1:{port}"
            await sender.wait_serving(target)
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(target))
            stub = sender_pb2_grpc.SenderServiceStub(channel)
            for provider in PROVIDERS:  # warm-up: connections, template cache
                await one_run(stub, provider, BATCH)
            for n in range(runs):
                for provider in PROVIDERS:
                    resend.emails.clear()
                    resend.requests.clear()
                    sendgrid.messages.clear()
                    sendgrid.requests.clear()
                    cpu_before = sender.cpu_seconds()
                    rate = await one_run(stub, provider, count)
                    results[provider].append(rate)
                    cpu[provider].append((sender.cpu_seconds() - cpu_before) * 1e6 / count)
                    print(f"run {n + 1}: {provider} {rate:,.0f} messages/s", flush=True)
    return results, cpu


def build_table(
    results: dict[str, list[float]], cpu: dict[str, list[float]], count: int, runs: int
) -> Table:
    table = Table(title=f"SendBatch from one sender: {count:,} messages, median of {runs}")
    columns = ("provider", "shape", "messages/s", "min", "max", "ratio vs sandbox", "sender CPU")
    for name in columns:
        table.add_column(name, justify="left" if name in ("provider", "shape") else "right")
    base = statistics.median(results["sandbox"])
    shapes = {
        "sandbox": "whole SendBatch, no network (baseline)",
        "resend": "/emails/batch of 100, local fake",
        "sendgrid": "personalizations (same body), local fake",
    }
    for provider, values in results.items():
        table.add_row(
            provider,
            shapes[provider],
            f"{statistics.median(values):,.0f}",
            f"{min(values):,.0f}",
            f"{max(values):,.0f}",
            f"{statistics.median(values) / base:.2f}x",
            f"{statistics.median(cpu[provider]):,.0f} ms/1k",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sender", description=__doc__)
    parser.add_argument("--count", type=int, default=20_000, help="messages per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per provider (median)")
    args = parser.parse_args(argv)
    results, cpu = asyncio.run(measure(args.count, args.runs))
    Console(width=130).print(build_table(results, cpu, args.count, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
