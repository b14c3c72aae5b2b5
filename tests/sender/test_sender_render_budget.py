"""Hostile templates beside ordinary ones, over real gRPC: the hostile ones fail fast and
permanently, the ordinary ones are answered on time, health answers throughout, and the
sender's memory does not grow with what the templates asked for."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.common.errors import Unavailable
from sluice.common.telemetry import disabled
from sluice.sender import app
from sluice.sender.render import Template
from sluice.sender.render_pool import RenderBudget, RenderPool
from sluice.sender.settings import SenderSettings
from sluice.v1 import sender_pb2, sender_pb2_grpc
from tests.conftest import REDIS_URL

PROVIDERS = """
[[providers]]
name = "fast"
kind = "sandbox"
cost_per_thousand = 0.1
intents = ["marketing"]
"""
NESTED_LOOPS = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}done"
)
HOSTILE = {
    "nested": NESTED_LOOPS,
    "literal": "{{ 'a' * 10**8 }}",
    "variable": "{{ name * 100000000 }}",
    "padding": "{{ name|center(10**9) }}",
    "printing": "{% for i in range(100000) %}{% for j in range(100000) %}xx"
    "{% endfor %}{% endfor %}",
}


def content(id: str, body: str) -> sender_pb2.TemplateContent:
    return sender_pb2.TemplateContent(
        id=id,
        version=1,
        subject="Hi {{ name }}",
        html_body=body,
        text_body="Hi {{ name }}",
        variables=["name"],
        from_address="noreply@example.com",
    )


def batch(template: sender_pb2.TemplateContent, n: int, tag: str) -> sender_pb2.SendBatchRequest:
    return sender_pb2.SendBatchRequest(
        provider="fast",
        template=template,
        messages=[
            sender_pb2.OutboundMessage(
                intent_id=f"{tag}-{i}",
                recipient=f"user{i}@example.com",
                variables={"name": f"user{i}"},
                idempotency_key=f"{tag}-{i}",
            )
            for i in range(n)
        ],
    )


@pytest.fixture
async def channel(tmp_path: Path, redis_prefix: str) -> AsyncIterator[grpc.aio.Channel]:
    providers = tmp_path / "providers.toml"
    providers.write_text(PROVIDERS)
    settings = SenderSettings(
        redis_url=REDIS_URL, redis_prefix=redis_prefix, providers_file=str(providers)
    )
    async with (
        app.running(settings, disabled(), port=0) as handle,
        grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as chan,
    ):
        yield chan


async def test_hostile_templates_fail_fast_and_stall_nothing(channel: grpc.aio.Channel) -> None:
    stub = sender_pb2_grpc.SenderServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    stop = asyncio.Event()
    health_latencies: list[float] = []

    async def probe() -> None:
        while not stop.is_set():
            started = time.monotonic()
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            health_latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.05)

    async def hostile(name: str, body: str) -> tuple[str, float, sender_pb2.SendBatchResponse]:
        started = time.monotonic()
        reply = await stub.SendBatch(batch(content(name, body), 10, name), timeout=30)
        return name, time.monotonic() - started, reply

    ordinary_latencies: list[float] = []

    async def ordinary() -> None:
        for round_ in range(15):
            started = time.monotonic()
            reply = await stub.SendBatch(
                batch(content("ok", "<p>Hi {{ name }}</p>"), 20, f"ok{round_}"), timeout=30
            )
            ordinary_latencies.append(time.monotonic() - started)
            assert {r.outcome for r in reply.results} == {sender_pb2.SEND_OUTCOME_ACCEPTED}
            await asyncio.sleep(0.05)

    prober = asyncio.create_task(probe())
    try:
        results = await asyncio.gather(
            ordinary(), *(hostile(name, body) for name, body in HOSTILE.items())
        )
    finally:
        stop.set()
        await prober

    for name, elapsed, reply in results[1:]:
        assert [r.outcome for r in reply.results] == [
            sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE
        ] * 10, name
        assert all(r.reason.startswith("render: ") for r in reply.results), reply.results[0]
        # One message's budget (0.5 s), then the rest of the batch fails with it.
        assert elapsed < 5, (name, elapsed)
    # Generous for a loaded 2-core box; rendering on the event loop took minutes here.
    assert max(ordinary_latencies) < 3, ordinary_latencies
    assert health_latencies, "health was never answered"
    assert max(health_latencies) < 1.5, max(health_latencies)
    # 10 x 100 MB bodies rendered in this process would have shown here.
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert maxrss_after - maxrss_before < 100 * 1024, (maxrss_before, maxrss_after)

    # The template that ran out of time is known now: a new batch of it fails at once.
    started = time.monotonic()
    again = await stub.SendBatch(batch(content("nested", NESTED_LOOPS), 5, "again"), timeout=30)
    assert time.monotonic() - started < 1
    assert "time budget" in again.results[0].reason
    assert {r.outcome for r in again.results} == {sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE}


async def test_pool_reasons_name_the_budget_and_a_stuck_worker_is_replaced() -> None:
    pool = RenderPool(1, RenderBudget(message_seconds=0.3, batch_seconds=1.0))
    try:
        await pool.start()
        slow = Template("slow", 1, "s", NESTED_LOOPS, "t", ("name",), "")
        out = await pool.render(slow, [{"name": "a"}, {"name": "b"}])
        assert [str(e) for e in out] == ["template exceeded the render time budget of 0.3 s"] * 2
        big = Template("big", 1, "s", "{{ name|center(10**9) }}", "t", ("name",), "")
        (err,) = await pool.render(big, [{"name": "a"}])
        assert "memory budget" in str(err)
        # The worker survived both: an ordinary render still works, escaped.
        ok = Template("ok", 1, "S {{ name }}", "<p>{{ name }}</p>", "T", ("name",), "")
        (msg,) = await pool.render(ok, [{"name": "<b>"}])
        assert not isinstance(msg, Exception)
        assert msg.html == "<p>&lt;b&gt;</p>"
    finally:
        await pool.aclose()


def _manager_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if type(t).__name__ == "_ExecutorManagerThread"]


async def test_a_dead_idle_worker_rebuilds_the_pool_and_close_joins_every_manager_thread() -> None:
    """A worker that dies while idle makes ``submit`` itself raise BrokenProcessPool: that
    batch is answered unavailable (retried later) and the pool rebuilt, not an error for
    every batch after it. And a manager thread left running at exit races the interpreter's
    exit hook over its wake-up pipe (Python 3.11 prints ``OSError: [Errno 9] Bad file
    descriptor`` as the sender exits, which failed CI): closing the pool, including the one
    retired by the rebuild, must leave none running."""
    before = set(_manager_threads())
    pool = RenderPool(1)
    await pool.start()
    # A worker killed from outside (as the kernel's OOM killer would) breaks the pool; the
    # next render rebuilds it and leaves the broken pool's manager thread behind.
    for process in list(pool._pool._processes.values()):  # type: ignore[union-attr]
        process.kill()
        await asyncio.to_thread(process.join)
    ok = Template("ok", 1, "s", "{{ name }}", "t", ("name",), "")
    with pytest.raises(Unavailable):
        await pool.render(ok, [{"name": "a"}])
    (msg,) = await pool.render(ok, [{"name": "a"}])
    assert not isinstance(msg, Exception)
    await pool.aclose()
    assert [t for t in _manager_threads() if t not in before] == []


ORPHAN_SCRIPT = """
import asyncio, os, sys, time
from sluice.sender.render_pool import RenderPool

async def main():
    pool = RenderPool(2)
    await pool.start()
    with open(sys.argv[1] + ".tmp", "w") as out:
        out.write(" ".join(str(p) for p in pool._pool._processes))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(600)

if __name__ == "__main__":
    asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_render_workers_exit_when_their_sender_is_killed(tmp_path: Path) -> None:
    """A sender killed with SIGKILL cannot shut its pool down: its workers must still go,
    not wait on the call queue forever (CI runs left such orphans behind)."""
    script, pids = tmp_path / "sender_like.py", tmp_path / "pids"
    script.write_text(ORPHAN_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(pids)])  # noqa: ASYNC220
    workers: list[int] = []
    try:
        for _ in range(600):
            if pids.exists() or proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        workers = [int(p) for p in pids.read_text().split()]
        assert len(workers) == 2
        assert all(_alive(p) for p in workers)
    finally:
        proc.kill()
        proc.wait()
    for _ in range(150):
        if not any(_alive(p) for p in workers):
            break
        await asyncio.sleep(0.1)
    left = [p for p in workers if _alive(p)]
    for pid in left:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert left == []
