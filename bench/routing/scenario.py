"""Routing scenarios as data: providers, waves and streams of intents, outages (TOML)."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCENARIOS_FILE = Path(__file__).resolve().parent / "scenarios.toml"


@dataclass(frozen=True)
class ProviderSpec:
    """A sandbox-like provider: price, sustained rate, burst, intent kinds."""

    name: str
    cost_per_thousand: float
    sustained_rate: float
    burst: int
    intents: frozenset[str]


@dataclass(frozen=True)
class Arrival:
    """One intent: submitted at ``at``, due to be sent by ``deadline`` (absolute seconds)."""

    kind: str
    at: float
    deadline: float


@dataclass(frozen=True)
class Outage:
    """``provider`` answers every send with a 5xx during [start, end)."""

    provider: str
    start: float
    end: float


@dataclass(frozen=True)
class Scenario:
    """One scenario: who can send, what arrives when, what breaks."""

    name: str
    providers: tuple[ProviderSpec, ...]
    arrivals: tuple[Arrival, ...]
    outages: tuple[Outage, ...]

    def failing(self, provider: str, now: float) -> bool:
        """True when ``provider`` is in an outage at ``now``."""
        return any(o.provider == provider and o.start <= now < o.end for o in self.outages)

    @property
    def horizon(self) -> float:
        """The last deadline: past it nothing can still be sent in time."""
        return max((a.deadline for a in self.arrivals), default=0.0)


def _providers(raw: Sequence[Mapping[str, Any]]) -> tuple[ProviderSpec, ...]:
    return tuple(
        ProviderSpec(
            name=str(p["name"]),
            cost_per_thousand=float(p["cost_per_thousand"]),
            sustained_rate=float(p["sustained_rate"]),
            burst=int(p["burst"]),
            intents=frozenset(str(k) for k in p["intents"]),
        )
        for p in raw
    )


def _arrivals(raw: Mapping[str, Any]) -> tuple[Arrival, ...]:
    out: list[Arrival] = []
    for wave in raw.get("waves", []):
        at = float(wave["at"])
        out.extend(
            Arrival(str(wave["kind"]), at, at + float(wave["deadline"]))
            for _ in range(int(wave["count"]))
        )
    for stream in raw.get("streams", []):
        step = 1.0 / float(stream["rate"])
        t = float(stream["start"])
        while t < float(stream["end"]):
            out.append(Arrival(str(stream["kind"]), t, t + float(stream["deadline"])))
            t += step
    return tuple(sorted(out, key=lambda a: a.at))


def load_scenarios(path: Path = SCENARIOS_FILE) -> list[Scenario]:
    """Every scenario of a scenarios file."""
    document = tomllib.loads(path.read_text(encoding="utf-8"))
    defaults = _providers(document.get("providers", []))
    return [
        Scenario(
            name=str(raw["name"]),
            providers=_providers(raw["providers"]) if "providers" in raw else defaults,
            arrivals=_arrivals(raw),
            outages=tuple(
                Outage(str(o["provider"]), float(o["start"]), float(o["end"]))
                for o in raw.get("outages", [])
            ),
        )
        for raw in document["scenarios"]
    ]
