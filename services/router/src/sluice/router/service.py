"""RouterService: the operators' view of the queue and of the providers' health."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from sluice.common.db import Executor
from sluice.common.grpcserver import duration_from_seconds
from sluice.common.model import KIND_TO_PROTO, STATUS_TO_PROTO
from sluice.common.providers import INTENT_KINDS, ProviderConfig
from sluice.router import repository
from sluice.router.health import ProviderHealthTracker
from sluice.v1 import intent_pb2, router_pb2, router_pb2_grpc


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """GetQueueStats from PostgreSQL; ListProviders from configuration plus this router's
    health tracker (shared with its dispatcher)."""

    def __init__(
        self,
        pool: Executor,
        providers: Sequence[ProviderConfig],
        health: ProviderHealthTracker,
    ) -> None:
        self._pool = pool
        self._providers = tuple(providers)
        self._health = health

    async def GetQueueStats(
        self, request: router_pb2.GetQueueStatsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.GetQueueStatsResponse:
        """Counts by status, intent and provider, plus the due backlog."""
        stats = await repository.queue_stats(self._pool, request.campaign_id or None)
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
        )

    async def ListProviders(
        self, request: router_pb2.ListProvidersRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListProvidersResponse:
        """Every configured provider with its health and recent success rate."""
        return router_pb2.ListProvidersResponse(
            providers=[self._provider(p) for p in self._providers]
        )

    def _provider(self, config: ProviderConfig) -> router_pb2.Provider:
        report = self._health.report(config.name)
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
        )
