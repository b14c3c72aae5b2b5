"""Settings: read once from an environment mapping into a frozen object.

Every service builds one :class:`Settings` at start-up with :func:`Settings.from_env` and
passes it down; nothing else reads the environment. A bad value fails at start-up with a
message naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TypeVar

from sluice.common.errors import ConfigError

T = TypeVar("T")

_EXPORTERS = ("none", "console", "otlp")
_LOG_FORMATS = ("json", "text")


@dataclass(frozen=True)
class Settings:
    """All of Sluice's configuration. See the README's configuration reference."""

    database_url: str = ""
    redis_url: str = ""
    redis_prefix: str = "sluice"
    listen_host: str = "127.0.0.1"
    ingest_port: int = 50051
    router_port: int = 50052
    sender_port: int = 50053
    sender_target: str = "127.0.0.1:50053"
    providers_file: str = ""
    log_level: str = "INFO"
    log_format: str = "text"
    otel_exporter: str = "none"
    otlp_endpoint: str = "http://127.0.0.1:4317"
    db_pool_size: int = 10
    router_batch_size: int = 500
    router_concurrency: int = 4
    router_idle_sleep: float = 0.2
    lease_seconds: float = 30.0
    max_attempts: int = 8
    retry_base_seconds: float = 5.0
    retry_max_seconds: float = 600.0
    default_deadline_seconds: float = 86_400.0
    sender_timeout_seconds: float = 10.0
    shutdown_grace_seconds: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Builds settings from ``SLUICE_*`` variables (plus ``DATABASE_URL``, ``REDIS_URL``
        and ``OTEL_EXPORTER_OTLP_ENDPOINT``); unset variables keep their defaults."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        aliases = {
            "database_url": "DATABASE_URL",
            "redis_url": "REDIS_URL",
            "otlp_endpoint": "OTEL_EXPORTER_OTLP_ENDPOINT",
        }
        for f in fields(cls):
            name = aliases.get(f.name, f"SLUICE_{f.name.upper()}")
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            default = f.default
            conv: Callable[[str], object]
            if isinstance(default, bool):
                conv = _parse_bool
            elif isinstance(default, int):
                conv = int
            elif isinstance(default, float):
                conv = float
            else:
                conv = str
            try:
                values[f.name] = conv(raw)
            except ValueError as exc:
                raise ConfigError(
                    f"{name}={raw!r} is not a valid {type(default).__name__}"
                ) from exc
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raises ConfigError naming the first setting that is out of range."""
        if self.otel_exporter not in _EXPORTERS:
            raise ConfigError(f"SLUICE_OTEL_EXPORTER must be one of {', '.join(_EXPORTERS)}")
        if self.log_format not in _LOG_FORMATS:
            raise ConfigError(f"SLUICE_LOG_FORMAT must be one of {', '.join(_LOG_FORMATS)}")
        if "{" in self.redis_prefix or "}" in self.redis_prefix:
            raise ConfigError("SLUICE_REDIS_PREFIX must not contain braces (they make hash tags)")
        for name in ("router_batch_size", "router_concurrency", "max_attempts", "db_pool_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SLUICE_{name.upper()} must be at least 1")
        for name in ("lease_seconds", "sender_timeout_seconds", "retry_base_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"SLUICE_{name.upper()} must be positive")
        if self.sender_timeout_seconds >= self.lease_seconds:
            raise ConfigError(
                "SLUICE_SENDER_TIMEOUT_SECONDS must be shorter than SLUICE_LEASE_SECONDS, "
                "or a lease could expire while its batch is still being sent"
            )

    def require_database(self) -> str:
        """The database URL, or a start-up error naming DATABASE_URL."""
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set (e.g. postgresql://user@host:5432/sluice)")
        return self.database_url

    def require_redis(self) -> str:
        """The Redis URL, or a start-up error naming REDIS_URL."""
        if not self.redis_url:
            raise ConfigError("REDIS_URL is not set (e.g. redis://host:6379/0)")
        return self.redis_url


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
