"""``sluice demo``: a sample mixed campaign through a stack, with progress and a summary.

The demo is a plain gRPC client: it submits with ``IngestService.SubmitIntents`` and
watches ``RouterService.GetQueueStats`` for its campaign, so it works the same against
``sluice dev``, a cluster, or the stack it starts itself when nothing answers.

Every item of a campaign is a pure function of (campaign id, index): the idempotency key is
``<campaign>/<index>`` and the payload never changes, so re-running a campaign is a retry
that ingest recognises ("0 new, N existing"), never a conflicting reuse of a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.markup import escape

from sluice.cli.demo_campaign import (
    FAIL_RECIPIENT,
    campaign_items,
    submit_campaign,
)
from sluice.cli.demo_progress import watch_campaign
from sluice.cli.demo_report import DemoResult, failure_lines, fold_stats, print_summary, status_name
from sluice.cli.demo_spill import explain_routing, new_campaign_id
from sluice.cli.stack_settings import StackSettings
from sluice.common.auth import client_interceptors
from sluice.v1 import ingest_pb2_grpc, router_pb2, router_pb2_grpc

# FAIL_RECIPIENT and campaign_items moved to demo_campaign; they stay importable from here
# because callers (the CLI tests) import them from sluice.cli.demo.
__all__ = [
    "DEFAULT_INGEST",
    "DEFAULT_ROUTER_PORT",
    "FAIL_RECIPIENT",
    "answers_health",
    "campaign_items",
    "router_target_for",
    "run_demo",
    "run_demo_command",
]

DEFAULT_INGEST = "127.0.0.1:50051"
DEFAULT_ROUTER_PORT = 50052


#: The token ``sluice demo`` (and other client commands) send to an existing stack.
TOKEN_VARIABLE = "SLUICE_TOKEN"  # noqa: S105 - a variable name, not a secret


async def answers_health(target: str, probe_seconds: float = 1.0) -> bool:
    """True when a gRPC server at ``target`` says SERVING."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=probe_seconds
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


async def run_demo(
    ingest_target: str,
    router_target: str,
    *,
    count: int,
    campaign: str | None,
    wait_seconds: float,
    console: Console,
    token: str = "",
) -> DemoResult:
    """Submits the campaign, waits for it, prints the summary and returns its numbers.

    Without a campaign id it makes a fresh one, here, just before submitting: a generated
    id carries the start of its marketing deadline (see :mod:`sluice.cli.demo_spill`).
    ``token`` (scopes submit and read) goes with every call; "" for a stack without auth.
    """
    if campaign is None:
        campaign = new_campaign_id(count)
    auth = client_interceptors(token)
    async with (
        grpc.aio.insecure_channel(ingest_target, interceptors=auth) as ingest_channel,
        grpc.aio.insecure_channel(router_target, interceptors=auth) as router_channel,
    ):
        # grpc has no type stubs, so mypy cannot pick the aio overload of the stub itself.
        ingest = cast(
            "ingest_pb2_grpc.IngestServiceAsyncStub",
            ingest_pb2_grpc.IngestServiceStub(ingest_channel),
        )
        router = cast(
            "router_pb2_grpc.RouterServiceAsyncStub",
            router_pb2_grpc.RouterServiceStub(router_channel),
        )
        providers: router_pb2.ListProvidersResponse = await router.ListProviders(
            router_pb2.ListProvidersRequest(), timeout=10
        )
        costs = {p.name: p.cost_per_thousand for p in providers.providers}
        before: router_pb2.GetQueueStatsResponse = await router.GetQueueStats(
            router_pb2.GetQueueStatsRequest(campaign_id=campaign), timeout=10
        )
        already = fold_stats(before).by_status
        sent_before = already["sent"] + already["delivered"]

        console.print(
            f"campaign [bold]{escape(campaign)}[/]: {count} intents to {ingest_target} "
            f"(router {router_target})"
        )
        started = time.perf_counter()
        items = campaign_items(campaign, count)
        routing = explain_routing(providers.providers, items, datetime.now(UTC))
        report = await submit_campaign(ingest, items, rpc_seconds=30)
        console.print(
            f"submitted in {report.seconds:.2f} s: [bold]{report.created} new, "
            f"{report.existing} existing, {len(report.rejected)} rejected[/]",
            highlight=False,
        )
        for rej in report.rejected:
            why = "; ".join(f"{f}: {d}" for f, d in rej.violations) or rej.message
            console.print(
                f"  rejected #{rej.index} {rej.recipient!r}: {status_name(rej.code)}: {why}",
                highlight=False,
                markup=False,
            )
        final, timed_out = await watch_campaign(
            router,
            campaign,
            expected=report.accepted,
            deadline=started + wait_seconds,
            console=console,
        )
        elapsed = time.perf_counter() - started
        failures = await failure_lines(ingest, campaign) if final.by_status["failed"] else []
    result = DemoResult(
        campaign=campaign,
        requested=count,
        submit=report,
        final=final,
        sent_before=sent_before,
        elapsed=elapsed,
        timed_out=timed_out,
        costs=costs,
        routing=routing,
    )
    print_summary(result, console, failures)
    return result


def router_target_for(ingest_target: str) -> str:
    """The router beside an ingest at ``host:port``: same host, port 50052."""
    host, _, _ = ingest_target.rpartition(":")
    return f"{host or '127.0.0.1'}:{DEFAULT_ROUTER_PORT}"


def run_demo_command(
    *,
    count: int,
    target: str | None,
    router: str | None,
    campaign: str | None,
    timeout: float,
    state_dir: str,
) -> int:
    """``sluice demo``: use the given or local stack, or start one for the run."""
    try:
        return asyncio.run(
            _demo_main(
                count=count,
                target=target,
                router=router,
                campaign=campaign,
                wait_seconds=timeout,
                state_dir=Path(state_dir),
            )
        )
    except grpc.aio.AioRpcError as exc:
        print(f"sluice demo: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


async def _demo_main(
    *,
    count: int,
    target: str | None,
    router: str | None,
    campaign: str | None,
    wait_seconds: float,
    state_dir: Path,
) -> int:
    from sluice.cli.dev import local_stack, run_stoppable
    from sluice.cli.serve import configure_logging

    # soft_wrap: status lines stay whole in CI logs (no terminal, so no width to fit).
    console = Console(soft_wrap=True)
    if target is None and await answers_health(DEFAULT_INGEST):
        target = DEFAULT_INGEST
        console.print(f"using the stack answering on {target}")
    if target is not None:
        result = await run_demo(
            target,
            router or router_target_for(target),
            count=count,
            campaign=campaign,
            wait_seconds=wait_seconds,
            console=console,
            token=os.environ.get(TOKEN_VARIABLE, ""),
        )
        return result.exit_code

    settings = StackSettings.from_env()
    # The services' INFO lines would tear through the progress display; warnings still show.
    configure_logging(settings.common, level="WARNING")

    def say(message: str) -> None:
        console.print(f"[dim]{message}[/]", highlight=False)

    async def body(stop: asyncio.Event, ready: asyncio.Event) -> int:
        say("no stack answers on 127.0.0.1:50051: starting one for this demo")
        async with local_stack(settings, state_dir=state_dir, any_ports=True, say=say) as stack:
            ready.set()
            demo = asyncio.create_task(
                run_demo(
                    stack.ingest,
                    stack.router,
                    count=count,
                    campaign=campaign,
                    wait_seconds=wait_seconds,
                    console=console,
                    token=stack.token,
                )
            )
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({demo, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not demo.done():
                demo.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await demo
                say("interrupted: stopping the stack")
                return 130
            return demo.result().exit_code

    return await run_stoppable(body)
