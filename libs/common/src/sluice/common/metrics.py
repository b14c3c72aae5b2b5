"""Prometheus metrics: one registry per service, the RPC instruments every server has, and
the HTTP app that serves them.

Instrumentation lives in one place per service (``sluice.<service>.metrics``), a class that
observes domain outcomes (a round's results, a batch's grants) and turns them into counter
and histogram updates, so business code never bumps counters itself. This module gives those
classes their registry and the shared RPC metrics, which the gRPC error interceptor observes.

Names follow Prometheus conventions: ``sluice_`` prefix, base units (seconds, US dollars),
``_total`` for counters. No label ever carries a recipient address or a secret; labels are
bounded sets (service, method, status code, provider, intent kind, outcome, reason).

Metrics can be turned off (``enabled=False``): the observers then return at once, which is
what the benchmark compares against to measure their cost.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

#: Latency buckets for RPCs and provider calls, seconds: 0.5 ms to 30 s.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Metrics:
    """The registry of one service process and its RPC instruments.

    Service metrics classes take a ``Metrics`` and register their own instruments in
    ``registry``; ``enabled`` tells them whether to observe at all.
    """

    def __init__(self, service: str, *, enabled: bool = True) -> None:
        self.service = service
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpc_requests = Counter(
            "sluice_rpc_requests",
            "gRPC calls handled, by method and status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.rpc_duration = Histogram(
            "sluice_rpc_duration_seconds",
            "Time to handle a gRPC call (streams: until the call ends).",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.auth_refusals = Counter(
            "sluice_auth_refusals",
            "Calls refused by authentication or authorisation, by reason.",
            ["service", "reason"],
            registry=self.registry,
        )
        self._rpc_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Records one finished RPC (called by the server interceptor)."""
        if not self.enabled:
            return
        key = (method, code)
        children = self._rpc_children.get(key)
        if children is None:
            # Child look-ups hash their label tuple under a lock: cache them per method.
            children = (
                self.rpc_requests.labels(self.service, method, code),
                self.rpc_duration.labels(self.service, method),
            )
            self._rpc_children[key] = children
        count, duration = children
        count.inc()
        duration.observe(seconds)

    def exposition(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)


def disabled_metrics(service: str = "test") -> Metrics:
    """Metrics that observe nothing (tests that do not look at them)."""
    return Metrics(service, enabled=False)


def metrics_app(metrics: Metrics, health: HealthFlag) -> web.Application:
    """An aiohttp app serving ``/metrics`` and ``/healthz`` (200 serving, 503 not)."""

    async def serve_metrics(_: web.Request) -> web.Response:
        body = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def serve_health(_: web.Request) -> web.Response:
        if health.serving:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="not serving\n")

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", serve_health)
    return app


class HealthFlag:
    """A serving/not-serving flag an HTTP listener answers health checks from."""

    def __init__(self) -> None:
        self.serving = False
