"""Ingest's settings: the common part plus what only ingest reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sluice.common.settings import CommonSettings


@dataclass(frozen=True)
class IngestSettings(CommonSettings):
    """Ingest's configuration (``SLUICE_*``); see the README's configuration reference."""

    service: ClassVar[str] = "ingest"

    metrics_port: int = 9091
    ingest_port: int = 50051
    default_deadline_seconds: float = 86_400.0

    def validate(self) -> None:
        super().validate()
        self.require_port("ingest_port")
        self.require_positive("default_deadline_seconds")
