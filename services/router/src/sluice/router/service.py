"""RouterService: the operators' view of the queue and the providers, and their controls
(pause, resume, re-queue failed intents)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg
import grpc

from sluice.common.db import Executor
from sluice.common.errors import InvalidArgument, Unavailable
from sluice.common.grpcserver import duration_from_seconds
from sluice.common.model import KIND_TO_PROTO, STATUS_TO_PROTO
from sluice.common.providers import INTENT_KINDS, ProviderConfig
from sluice.router import controls, repository
from sluice.router.circuit import CircuitState
from sluice.router.health import ProviderHealthTracker
from sluice.v1 import intent_pb2, router_pb2, router_pb2_grpc

if TYPE_CHECKING:
    from sluice.router.provider_state import ProviderState
    from sluice.router.round import RoundBook

_PROTO_TO_KIND = {v: k for k, v in KIND_TO_PROTO.items()}
_CIRCUIT_TO_PROTO = {
    CircuitState.CLOSED: router_pb2.CIRCUIT_STATE_CLOSED,
    CircuitState.OPEN: router_pb2.CIRCUIT_STATE_OPEN,
    CircuitState.HALF_OPEN: router_pb2.CIRCUIT_STATE_HALF_OPEN,
}
MAX_RETRY_LIMIT = 10_000
MAX_REQUEST_ID = 200


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """Reads PostgreSQL for the queue and this router's provider state for the providers;
    pauses and re-queues are rows every router replica reads."""

    def __init__(
        self,
        pool: Executor,
        providers: Sequence[ProviderConfig],
        health: ProviderHealthTracker,
        state: ProviderState | None = None,
        book: RoundBook | None = None,
    ) -> None:
        self._pool = pool
        self._providers = tuple(providers)
        self._by_name = {p.name: p for p in providers}
        self._health = health
        self._state = state
        self._book = book

    async def GetQueueStats(
        self, request: router_pb2.GetQueueStatsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.GetQueueStatsResponse:
        """Counts by status, intent and provider, the due backlog, per-provider work and
        cost, and what held intents wait for."""
        # Database errors leave the repositories as Sluice errors (db_boundary).
        stats = await repository.queue_stats(self._pool, request.campaign_id or None)
        backlog = await controls.provider_backlog(self._pool)
        held = await controls.held(self._pool)
        return router_pb2.GetQueueStatsResponse(
            counts=[
                router_pb2.QueueCount(
                    status=STATUS_TO_PROTO.get(status, intent_pb2.INTENT_STATUS_UNSPECIFIED),
                    intent=KIND_TO_PROTO.get(kind, intent_pb2.INTENT_UNSPECIFIED),
                    provider=provider or "",
                    count=count,
                )
                for status, kind, provider, count in stats.counts
            ],
            due=stats.due,
            oldest_due_age=duration_from_seconds(stats.oldest_due_age_seconds),
            providers=[
                router_pb2.ProviderBacklog(
                    provider=b.provider, planned=b.planned, sent=b.sent, cost=b.cost
                )
                for b in backlog
            ],
            held=held,
        )

    async def ListProviders(
        self, request: router_pb2.ListProvidersRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListProvidersResponse:
        """Every configured provider with its health, circuit, pauses and cost so far."""
        pauses = await self._pauses()
        return router_pb2.ListProvidersResponse(
            providers=[self._provider(p, pauses) for p in self._providers]
        )

    async def PauseProvider(
        self, request: router_pb2.PauseProviderRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.PauseProviderResponse:
        """Pauses a provider for every intent or one."""
        config, kind = self._target(request.provider, request.intent)
        await controls.pause(self._pool, config.name, kind, request.reason[:500])
        await self._refresh()
        return router_pb2.PauseProviderResponse(
            provider=self._provider(config, await self._pauses())
        )

    async def ResumeProvider(
        self, request: router_pb2.ResumeProviderRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ResumeProviderResponse:
        """Resumes a paused provider; intents that waited for a provider are due at once."""
        config, kind = self._target(request.provider, request.intent)
        released = await controls.resume(self._pool, config.name, kind)
        await self._refresh()
        return router_pb2.ResumeProviderResponse(
            provider=self._provider(config, await self._pauses()), released=released
        )

    async def RetryFailed(
        self, request: router_pb2.RetryFailedRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RetryFailedResponse:
        """Re-queues failed intents; the same request_id answers the first call again."""
        violations: list[tuple[str, str]] = []
        if not request.request_id:
            violations.append(("request_id", "required, so a retried call re-queues nothing"))
        elif len(request.request_id) > MAX_REQUEST_ID:
            violations.append(("request_id", f"at most {MAX_REQUEST_ID} characters"))
        if request.provider and request.provider not in self._by_name:
            violations.append(("provider", f"no provider named {request.provider!r}"))
        if request.limit < 0 or request.limit > MAX_RETRY_LIMIT:
            violations.append(("limit", f"between 0 and {MAX_RETRY_LIMIT}"))
        extension = 3600.0
        if request.HasField("deadline_extension"):
            extension = request.deadline_extension.ToTimedelta().total_seconds()
            if extension <= 0:
                violations.append(("deadline_extension", "must be positive"))
        after = _time(request, "failed_after")
        before = _time(request, "failed_before")
        if after is not None and before is not None and after >= before:
            violations.append(("failed_before", "must be after failed_after"))
        if violations:
            raise InvalidArgument("invalid RetryFailed request", field_violations=violations)
        if not isinstance(self._pool, asyncpg.Pool):
            raise Unavailable("RetryFailed needs a connection pool")
        where = controls.RetryFilter(
            campaign_id=request.campaign_id,
            error_contains=request.error_contains,
            failed_after=after,
            failed_before=before,
            provider=request.provider or None,
            limit=request.limit or MAX_RETRY_LIMIT,
            deadline_extension_seconds=extension,
        )
        count, replayed = await controls.retry_failed(self._pool, request.request_id, where)
        return router_pb2.RetryFailedResponse(requeued=count, replayed=replayed)

    # ---- helpers -----------------------------------------------------------------------

    def _target(self, name: str, intent: int) -> tuple[ProviderConfig, str]:
        config = self._by_name.get(name)
        if config is None:
            raise InvalidArgument(
                "unknown provider", field_violations=[("provider", f"no provider named {name!r}")]
            )
        if intent == intent_pb2.INTENT_UNSPECIFIED:
            return config, ""
        kind = _PROTO_TO_KIND.get(intent)  # type: ignore[call-overload]
        if kind is None or kind not in config.intents:
            raise InvalidArgument(
                "provider does not serve that intent",
                field_violations=[("intent", f"{name} does not serve this intent")],
            )
        return config, kind

    async def _pauses(self) -> frozenset[tuple[str, str]]:
        return frozenset(await controls.paused(self._pool))

    async def _refresh(self) -> None:
        # This router follows at once; the others within their refresh interval.
        if self._book is not None:
            await self._book.refresh_pauses(force=True)

    def _provider(
        self, config: ProviderConfig, pauses: frozenset[tuple[str, str]]
    ) -> router_pb2.Provider:
        report = self._health.report(config.name)
        state = self._state
        return router_pb2.Provider(
            name=config.name,
            kind=config.kind,
            cost_per_thousand=config.cost_per_thousand,
            sustained_rate=config.sustained_rate,
            burst=config.burst,
            # In the proto enum's order, so the answer is stable.
            intents=[KIND_TO_PROTO[k] for k in INTENT_KINDS if k in config.intents],
            max_batch_size=config.max_batch_size,
            enabled=config.enabled,
            health=report.state.to_proto(),
            success_rate=report.success_rate,
            circuit=_CIRCUIT_TO_PROTO[state.circuit(config.name)]
            if state is not None
            else router_pb2.CIRCUIT_STATE_CLOSED,
            paused=(config.name, "") in pauses,
            paused_intents=[KIND_TO_PROTO[k] for k in INTENT_KINDS if (config.name, k) in pauses],
            reachable=state is None or not state.is_down(config.name),
            cost_so_far=state.cost.get(config.name, 0.0) if state is not None else 0.0,
        )


def _time(request: router_pb2.RetryFailedRequest, name: str) -> datetime | None:
    if not request.HasField(name):  # type: ignore[arg-type]
        return None
    value: datetime = getattr(request, name).ToDatetime(tzinfo=UTC)
    return value
