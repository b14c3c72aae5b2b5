"""Provider configuration: what each email provider costs, how fast it may be used, and
which intents it serves.

The router reads it to choose providers; the sender reads it to find each provider's
adapter and rate limits. Both load the same file (``SLUICE_PROVIDERS_FILE``), or the
built-in development set when none is given. Parsing is strict (see
:mod:`sluice.common.provider_kinds`): an unknown key or a value of the wrong type stops
start-up with a message naming the provider and the key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sluice.common.errors import ConfigError
from sluice.common.provider_kinds import (
    KIND_SETTINGS,
    KindSettings,
    ResendSettings,
    SandboxSettings,
    Secret,
    SendGridSettings,
    SesSettings,
    SmtpSettings,
    check_value,
    parse_settings,
    reject_unknown,
)

__all__ = [
    "DEFAULT_PROVIDERS",
    "INTENT_KINDS",
    "PROVIDER_KINDS",
    "KindSettings",
    "ProviderConfig",
    "ResendSettings",
    "SandboxSettings",
    "Secret",
    "SendGridSettings",
    "SesSettings",
    "SmtpSettings",
    "load_providers",
    "parse_providers",
]

INTENT_KINDS = ("transactional", "marketing", "digest")
PROVIDER_KINDS = tuple(KIND_SETTINGS)
# Names become Redis hash tags and metric labels: no braces, spaces or colons.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class ProviderConfig:
    """One provider as configured.

    ``sustained_rate`` is messages per second over time and ``burst`` the most messages in
    any one second; ``requests_per_second`` and ``request_burst`` limit API calls the same
    way (a batch call is one request); ``daily_quota`` caps messages per day. 0 means that
    limit does not apply (``unlimited`` when both message limits are 0). ``verified`` says
    the sending domain is verified (the router uses only verified providers);
    ``smtputf8`` says it can take addresses that need SMTPUTF8. ``settings`` holds the
    kind's own typed settings (``SandboxSettings`` for ``kind = "sandbox"``, ...).
    """

    name: str
    kind: str
    cost_per_thousand: float
    sustained_rate: float
    burst: int
    intents: frozenset[str]
    max_batch_size: int = 100
    enabled: bool = True
    verified: bool = True
    smtputf8: bool = False
    requests_per_second: float = 0.0
    request_burst: int = 0
    daily_quota: int = 0
    settings: KindSettings = field(default_factory=SandboxSettings)

    def __post_init__(self) -> None:
        expected = KIND_SETTINGS.get(self.kind)
        if expected is None:
            raise ConfigError(
                f"provider {self.name!r}: kind {self.kind!r} is not one of "
                f"{', '.join(PROVIDER_KINDS)}"
            )
        if not isinstance(self.settings, expected):
            raise ConfigError(
                f"provider {self.name!r}: kind {self.kind!r} needs {expected.__name__}, "
                f"got {type(self.settings).__name__}"
            )

    @property
    def unlimited(self) -> bool:
        """True when neither message rate limit applies."""
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
        smtputf8=True,
    )


# The seed article's three providers, as sandboxes: same prices, limits and intents, so a
# local run shows real routing and real throttling without any account.
DEFAULT_PROVIDERS: tuple[ProviderConfig, ...] = (
    _sandbox("ses", 0.10, 14, 30, ("marketing", "digest")),
    _sandbox("resend", 0.25, 10, 20, ("transactional", "marketing")),
    _sandbox("sendgrid", 0.20, 12, 25, ("marketing", "digest")),
)

# Top-level keys of one [[providers]] entry, their types, and defaults (None = required).
_KEYS: dict[str, tuple[Any, Any]] = {
    "name": (str, None),
    "kind": (Literal["sandbox", "ses", "resend", "sendgrid", "smtp"], "sandbox"),
    "cost_per_thousand": (float, None),
    "sustained_rate": (float, 0.0),
    "burst": (int, 0),
    "intents": (tuple[str, ...], None),
    "max_batch_size": (int, 100),
    "enabled": (bool, True),
    "verified": (bool, True),
    "smtputf8": (bool, None),  # default depends on the kind, below
    "requests_per_second": (float, 0.0),
    "request_burst": (int, 0),
    "daily_quota": (int, 0),
}
assert set(PROVIDER_KINDS) == set(_KEYS["kind"][0].__args__), "kinds listed twice must agree"


def _provider_from_mapping(raw: Any, where: str) -> ProviderConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    if isinstance(raw.get("name"), str):
        where = f"{where} ({raw['name']!r})"
    if "options" in raw:
        raise ConfigError(
            f"{where}: 'options' is now 'settings', with typed values (see the README)"
        )
    reject_unknown(raw, [*_KEYS, "settings"], where)
    values: dict[str, Any] = {}
    for key, (tp, default) in _KEYS.items():
        if key in raw:
            values[key] = check_value(raw[key], tp, f"{where}.{key}")
        elif default is not None:
            values[key] = default
        elif key != "smtputf8":
            raise ConfigError(f"{where}: missing required key {key!r}")
    name, kind = values["name"], values["kind"]
    if not _NAME.match(name):
        raise ConfigError(f"{where}.name: use 1-63 letters, digits, '.', '_' or '-', got {name!r}")
    values.setdefault("smtputf8", kind == "sandbox")
    intents = frozenset(values.pop("intents"))
    unknown = intents - set(INTENT_KINDS)
    if unknown or not intents:
        raise ConfigError(
            f"{where}.intents: unknown or no intents {sorted(unknown)}; use {list(INTENT_KINDS)}"
        )
    settings_cls = KIND_SETTINGS[kind]
    settings = parse_settings(settings_cls, raw.get("settings", {}), f"{where}.settings")
    for key in ("cost_per_thousand", "sustained_rate", "burst", "requests_per_second"):
        if values[key] < 0:
            raise ConfigError(f"{where}.{key}: must not be negative")
    for key in ("request_burst", "daily_quota"):
        if values[key] < 0:
            raise ConfigError(f"{where}.{key}: must not be negative")
    if values["max_batch_size"] < 1:
        raise ConfigError(f"{where}.max_batch_size: must be at least 1")
    if values["burst"] and values["sustained_rate"] > values["burst"]:
        raise ConfigError(
            f"{where}: sustained_rate {values['sustained_rate']} exceeds burst {values['burst']}"
        )
    if values["request_burst"] and values["requests_per_second"] > values["request_burst"]:
        raise ConfigError(
            f"{where}: requests_per_second {values['requests_per_second']} exceeds "
            f"request_burst {values['request_burst']}"
        )
    return ProviderConfig(intents=intents, settings=settings, **values)


def parse_providers(
    document: Mapping[str, Any], source: str = "providers"
) -> tuple[ProviderConfig, ...]:
    """Builds provider configs from a parsed TOML document with a ``[[providers]]`` array."""
    reject_unknown(document, ["providers"], source)
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
