"""Settings: read once from an environment mapping into a frozen object per service.

Each service composes :class:`CommonSettings` (what every process needs: where PostgreSQL
and Redis are, logging, tracing, the shutdown budget) with its own knobs, in its own
package (``sluice.ingest.settings.IngestSettings`` and so on), so ingest is never configured
with router knobs. A service builds its settings once at start-up with ``from_env`` and
passes them down; nothing else reads the environment.

A bad value fails at start-up with a message naming the variable, and so does a
``SLUICE_*`` variable that no Sluice service knows (a typo such as
``SLUICE_ROUTER_BACH_SIZE`` must not silently keep the default). A variable that belongs to
another service is fine: one environment often configures the whole stack.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from sluice.common.errors import ConfigError

S = TypeVar("S", bound="CommonSettings")

_EXPORTERS = ("none", "console", "otlp")
_LOG_FORMATS = ("json", "text")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: Variables that are not SLUICE_* but are read as settings.
ALIASES: Mapping[str, str] = {
    "database_url": "DATABASE_URL",
    "redis_url": "REDIS_URL",
    "otlp_endpoint": "OTEL_EXPORTER_OTLP_ENDPOINT",
}

#: Secrets may instead be given as a file holding the value (a Kubernetes Secret mounted as
#: a volume: files, not environment variables, so no process listing or crash dump shows
#: them). The variable names the file; the value is its content, stripped.
SECRET_FILES: Mapping[str, str] = {
    "database_url": "DATABASE_URL_FILE",
    "redis_url": "REDIS_URL_FILE",
    "resend_webhook_secret": "SLUICE_RESEND_WEBHOOK_SECRET_FILE",
    "unsubscribe_secret": "SLUICE_UNSUBSCRIBE_SECRET_FILE",
}

#: SLUICE_* variables that are read by something other than a settings class (the test
#: suite, the CLI's own switches); they are never reported as unknown.
EXTRA_KNOWN_VARIABLES: set[str] = {
    "SLUICE_TEST_PG_ADMIN_DSN",
    "SLUICE_TEST_REDIS_URL",
    "SLUICE_TEST_EMBEDDED",
    "SLUICE_TOKEN",  # the token client commands (sluice demo, sluice status) send
}

_REGISTRY: list[type[CommonSettings]] = []

#: Where each service keeps its settings class. Imported (when installed) before unknown
#: variables are judged, so ``sluice serve ingest`` knows the router's variables too.
SERVICE_SETTINGS_MODULES = (
    "sluice.ingest.settings",
    "sluice.router.settings",
    "sluice.sender.settings",
)


def variable_name(field_name: str) -> str:
    """The environment variable a settings field is read from."""
    return ALIASES.get(field_name, f"SLUICE_{field_name.upper()}")


def known_variables() -> frozenset[str]:
    """Every variable any settings class defined so far reads, plus the extra known ones."""
    for module in SERVICE_SETTINGS_MODULES:
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(module)
    names = set(EXTRA_KNOWN_VARIABLES) | set(SECRET_FILES.values())
    for cls in _REGISTRY:
        names.update(variable_name(f.name) for f in fields(cls))
    return frozenset(names)


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """``SLUICE_*`` variables in ``env`` that no settings class reads, sorted."""
    known = known_variables()
    return sorted(k for k in env if k.startswith("SLUICE_") and k not in known)


def _converter(default: object) -> Callable[[str], object]:
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


@dataclass(frozen=True)
class CommonSettings:
    """What every Sluice process needs. See the README's configuration reference."""

    #: The service these settings are for ("" for the common part alone); used in messages.
    service: ClassVar[str] = ""

    database_url: str = ""
    redis_url: str = ""
    redis_prefix: str = "sluice"
    listen_host: str = "127.0.0.1"
    providers_file: str = ""
    log_level: str = "INFO"
    log_format: str = "text"
    otel_exporter: str = "none"
    otlp_endpoint: str = "http://127.0.0.1:4317"
    db_pool_size: int = 10
    shutdown_grace_seconds: float = 10.0
    #: Port of the Prometheus /metrics (and /healthz) HTTP listener; -1 turns it off.
    metrics_port: int = -1
    #: TOML file of token hashes and scopes (see sluice.common.auth); empty: no auth.
    auth_tokens_file: str = ""
    #: Refuse to start without a tokens file (the Kubernetes manifests set it).
    require_auth: bool = False
    #: Serve gRPC server reflection (what lets grpcurl work without proto files).
    reflection: bool = True
    #: PEM server certificate and key: TLS on the gRPC listener (see sluice.common.tls).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: CA whose client certificates are required (mutual TLS); empty: no client certs.
    tls_client_ca_file: str = ""
    #: One-click unsubscribe links (RFC 8058): ingest serves them, the router puts them in
    #: marketing and digest mail's List-Unsubscribe header. Both need the same secret.
    unsubscribe_secret: str = field(default="", repr=False)  # a secret: never printed
    unsubscribe_base_url: str = ""
    unsubscribe_ttl_days: float = 90.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY.append(cls)

    @classmethod
    def from_env(
        cls: type[S], env: Mapping[str, str] | None = None, *, check_unknown: bool = True
    ) -> S:
        """Builds settings from ``SLUICE_*`` variables (plus ``DATABASE_URL``, ``REDIS_URL``
        and ``OTEL_EXPORTER_OTLP_ENDPOINT``); unset or empty variables keep their defaults.

        Raises ConfigError naming the variable for a value of the wrong type or out of
        range, and (with ``check_unknown``) for a ``SLUICE_*`` variable no service reads.
        """
        env = os.environ if env is None else env
        if check_unknown:
            _check_unknown(env)
        values: dict[str, object] = {}
        for f in fields(cls):
            name = variable_name(f.name)
            raw = env.get(name)
            secret_file = env.get(SECRET_FILES.get(f.name, ""), "")
            if secret_file and not raw:
                name, raw = SECRET_FILES[f.name], _read_secret(SECRET_FILES[f.name], secret_file)
            if raw is None or raw == "":
                continue
            default = f.default
            try:
                values[f.name] = _converter(default)(raw)
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
        if self.log_level.upper() not in _LOG_LEVELS:
            raise ConfigError(
                f"SLUICE_LOG_LEVEL={self.log_level!r} is not one of {', '.join(_LOG_LEVELS)}"
            )
        if "{" in self.redis_prefix or "}" in self.redis_prefix:
            raise ConfigError("SLUICE_REDIS_PREFIX must not contain braces (they make hash tags)")
        self.require_at_least(1, "db_pool_size")
        self.require_positive("shutdown_grace_seconds")
        self.require_port("metrics_port", allow_off=True)
        if self.require_auth and not self.auth_tokens_file:
            raise ConfigError(
                "SLUICE_REQUIRE_AUTH is on but SLUICE_AUTH_TOKENS_FILE is not set: "
                "every RPC but health would be open to anyone who reaches the port"
            )

    # ---- helpers for subclasses' validate() ---------------------------------------------------

    def require_at_least(self, minimum: float, *names: str) -> None:
        """ConfigError unless each named field is at least ``minimum``."""
        for name in names:
            if getattr(self, name) < minimum:
                raise ConfigError(f"{variable_name(name)} must be at least {minimum}")

    def require_positive(self, *names: str) -> None:
        """ConfigError unless each named field is greater than zero."""
        for name in names:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{variable_name(name)} must be positive")

    def require_port(self, name: str, *, allow_off: bool = False) -> None:
        """ConfigError unless the field is a TCP port (0 = any free one; -1 = off if allowed)."""
        value = getattr(self, name)
        low = -1 if allow_off else 0
        if not low <= value <= 65535:
            off = " or -1 to turn it off" if allow_off else ""
            raise ConfigError(f"{variable_name(name)}={value} must be a port 0-65535{off}")

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


def _check_unknown(env: Mapping[str, str]) -> None:
    unknown = unknown_variables(env)
    if not unknown:
        return
    known = sorted(known_variables())
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise ConfigError(
        "unknown setting"
        + ("s " if len(unknown) > 1 else " ")
        + ", ".join(hints)
        + "; see the README's configuration reference"
    )


def register_known_variables(names: Iterable[str]) -> None:
    """Declares ``SLUICE_*`` variables read outside a settings class as known."""
    EXTRA_KNOWN_VARIABLES.update(names)


def _read_secret(variable: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:  # noqa: PTH123 - plain read at start-up
            return file.read().strip()
    except OSError as exc:
        raise ConfigError(f"{variable}={path}: {exc.strerror or exc}") from exc


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_REGISTRY.append(CommonSettings)
