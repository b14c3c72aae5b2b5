"""Provider configuration: what each email provider costs, how fast it may be used, and
which intents it serves.

The router reads it to choose providers; the sender reads it to find each provider's
adapter and rate limits. Both load the same file (``SLUICE_PROVIDERS_FILE``), or the
built-in development set when none is given.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sluice.common.errors import ConfigError

INTENT_KINDS = ("transactional", "marketing", "digest")
PROVIDER_KINDS = ("sandbox",)


@dataclass(frozen=True)
class ProviderConfig:
    """One provider as configured.

    ``sustained_rate`` is messages per second over time and ``burst`` the most messages in
    any one second; 0 for either means that limit does not apply (``unlimited`` when both are 0).
    """

    name: str
    kind: str
    cost_per_thousand: float
    sustained_rate: float
    burst: int
    intents: frozenset[str]
    max_batch_size: int = 100
    enabled: bool = True
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def unlimited(self) -> bool:
        """True when neither rate limit applies."""
        return self.sustained_rate <= 0 and self.burst <= 0

    def supports(self, intent: str) -> bool:
        """True when the provider is enabled and serves this intent kind."""
        return self.enabled and intent in self.intents


def _sandbox(
    name: str, cost: float, rate: float, burst: int, intents: Sequence[str]
) -> ProviderConfig:
    return ProviderConfig(
        name=name,
        kind="sandbox",
        cost_per_thousand=cost,
        sustained_rate=rate,
        burst=burst,
        intents=frozenset(intents),
        max_batch_size=50,
    )


# The seed article's three providers, as sandboxes: same prices, limits and intents, so a
# local run shows real routing and real throttling without any account.
DEFAULT_PROVIDERS: tuple[ProviderConfig, ...] = (
    _sandbox("ses", 0.10, 14, 30, ("marketing", "digest")),
    _sandbox("resend", 0.25, 10, 20, ("transactional", "marketing")),
    _sandbox("sendgrid", 0.20, 12, 25, ("marketing", "digest")),
)


def _provider_from_mapping(raw: Mapping[str, Any], where: str) -> ProviderConfig:
    def need(key: str) -> Any:
        if key not in raw:
            raise ConfigError(f"{where}: missing required key {key!r}")
        return raw[key]

    name = str(need("name"))
    kind = str(raw.get("kind", "sandbox"))
    if kind not in PROVIDER_KINDS:
        raise ConfigError(f"{where}: kind {kind!r} is not one of {', '.join(PROVIDER_KINDS)}")
    intents = frozenset(str(i) for i in need("intents"))
    unknown = intents - set(INTENT_KINDS)
    if unknown:
        raise ConfigError(f"{where}: unknown intents {sorted(unknown)}; use {list(INTENT_KINDS)}")
    try:
        config = ProviderConfig(
            name=name,
            kind=kind,
            cost_per_thousand=float(need("cost_per_thousand")),
            sustained_rate=float(raw.get("sustained_rate", 0)),
            burst=int(raw.get("burst", 0)),
            intents=intents,
            max_batch_size=int(raw.get("max_batch_size", 100)),
            enabled=bool(raw.get("enabled", True)),
            options=MappingProxyType({str(k): str(v) for k, v in raw.get("options", {}).items()}),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if config.cost_per_thousand < 0 or config.sustained_rate < 0 or config.burst < 0:
        raise ConfigError(f"{where}: cost, sustained_rate and burst must not be negative")
    if config.max_batch_size < 1:
        raise ConfigError(f"{where}: max_batch_size must be at least 1")
    if config.burst and config.sustained_rate > config.burst:
        raise ConfigError(
            f"{where}: sustained_rate {config.sustained_rate} exceeds burst {config.burst}"
        )
    return config


def parse_providers(
    document: Mapping[str, Any], source: str = "providers"
) -> tuple[ProviderConfig, ...]:
    """Builds provider configs from a parsed TOML document with a ``[[providers]]`` array."""
    raw_list = document.get("providers")
    if not isinstance(raw_list, list) or not raw_list:
        raise ConfigError(f"{source}: expected a non-empty [[providers]] array")
    providers = tuple(
        _provider_from_mapping(raw, f"{source}: providers[{i}]") for i, raw in enumerate(raw_list)
    )
    names = [p.name for p in providers]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: provider names must be unique, got {names}")
    return providers


def load_providers(path: str | Path | None) -> tuple[ProviderConfig, ...]:
    """Loads providers from a TOML file, or returns the development set when path is empty."""
    if not path:
        return DEFAULT_PROVIDERS
    file = Path(path)
    try:
        document = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"providers file {file} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"providers file {file} is not valid TOML: {exc}") from exc
    return parse_providers(document, str(file))


def takes_smtputf8(provider: ProviderConfig) -> bool:
    """True when ``provider`` can send to an address that needs SMTPUTF8.

    ``ProviderConfig.smtputf8`` says so once the provider adapters define it; until then
    only the sandbox (which sends nothing anywhere) counts as able."""
    able = getattr(provider, "smtputf8", None)
    return provider.kind == "sandbox" if able is None else bool(able)
