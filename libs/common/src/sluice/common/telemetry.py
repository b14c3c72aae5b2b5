"""OpenTelemetry, set up once per process, and the trace context that travels with intents.

A service calls :func:`setup_tracing` in its ``main()`` and passes the returned
:class:`Telemetry` to whatever builds gRPC servers and channels, which take their
interceptors from it. With the exporter ``none`` no interceptor is installed and every
span is the API's no-op span, so tracing that is off costs nothing.

An intent's trace context is stored with it as a W3C ``traceparent`` string; the router and
the sender start their per-intent spans as children of it, so one trace runs from the
client's submit call to the provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass
class Telemetry:
    """Tracing state of one process: a tracer and the gRPC interceptors that go with it."""

    enabled: bool
    tracer: trace.Tracer
    provider: TracerProvider | None = None
    _server_interceptors: list[Any] = field(default_factory=list)
    _client_interceptors: list[Any] = field(default_factory=list)

    def server_interceptors(self) -> list[Any]:
        """Interceptors for a ``grpc.aio`` server (empty when tracing is off)."""
        return list(self._server_interceptors)

    def client_interceptors(self) -> list[Any]:
        """Interceptors for a ``grpc.aio`` channel (empty when tracing is off)."""
        return list(self._client_interceptors)

    def shutdown(self) -> None:
        """Flushes and stops the exporter; safe to call twice."""
        if self.provider is not None:
            self.provider.shutdown()
            self.provider = None


def disabled() -> Telemetry:
    """Telemetry that records nothing (tests and tools)."""
    return Telemetry(enabled=False, tracer=trace.NoOpTracer())


def setup_tracing(
    service: str,
    exporter: str = "none",
    *,
    otlp_endpoint: str = "",
    span_exporter: SpanExporter | None = None,
) -> Telemetry:
    """Builds this process's tracer.

    ``exporter`` is ``none``, ``console`` or ``otlp``; ``span_exporter`` overrides it (tests
    pass an in-memory exporter). The provider is not installed as the global one: it is
    handed to the interceptors explicitly, so two services in one test process keep apart.
    """
    if span_exporter is None and exporter == "none":
        return disabled()
    from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor

    provider = TracerProvider(resource=Resource.create({"service.name": f"sluice-{service}"}))
    if span_exporter is None:
        if exporter == "console":
            span_exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter(endpoint=otlp_endpoint or None)
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    return Telemetry(
        enabled=True,
        tracer=provider.get_tracer(f"sluice.{service}"),
        provider=provider,
        _server_interceptors=[aio_server_interceptor(tracer_provider=provider)],  # type: ignore[no-untyped-call]
        _client_interceptors=list(aio_client_interceptors(tracer_provider=provider)),  # type: ignore[no-untyped-call]
    )


def current_traceparent() -> str:
    """The W3C traceparent of the active span, or ``""`` when there is none."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def context_from_traceparent(traceparent: str | None) -> otel_context.Context | None:
    """The context a stored traceparent names, for starting child spans; None if empty."""
    if not traceparent:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent})
