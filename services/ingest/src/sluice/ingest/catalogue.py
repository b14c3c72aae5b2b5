"""Wiring of ingest's catalogue services (templates, suppressions) into a gRPC server."""

from __future__ import annotations

import asyncpg
import grpc

from sluice.ingest.settings import IngestSettings
from sluice.ingest.suppression_service import SuppressionServicer
from sluice.ingest.templates_service import TemplateServicer
from sluice.v1 import suppression_pb2, suppression_pb2_grpc, template_pb2, template_pb2_grpc

#: The catalogue's gRPC service names (for health and reflection).
SERVICE_NAMES = (
    template_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name,
    suppression_pb2.DESCRIPTOR.services_by_name["SuppressionService"].full_name,
)


def register(server: grpc.aio.Server, pool: asyncpg.Pool, settings: IngestSettings) -> None:
    """Adds the catalogue servicers to ``server`` (they hold nothing that needs closing)."""
    template_pb2_grpc.add_TemplateServiceServicer_to_server(
        TemplateServicer(pool, settings), server
    )
    suppression_pb2_grpc.add_SuppressionServiceServicer_to_server(SuppressionServicer(pool), server)
