"""The sender's settings: the common part plus what only the sender reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sluice.common.settings import CommonSettings


@dataclass(frozen=True)
class SenderSettings(CommonSettings):
    """The sender's configuration (``SLUICE_*``); see the README's configuration reference."""

    service: ClassVar[str] = "sender"

    metrics_port: int = 9093
    sender_port: int = 50053

    def validate(self) -> None:
        super().validate()
        self.require_port("sender_port")
