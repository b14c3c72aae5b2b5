"""Settings of a whole stack in one process (``sluice dev``, ``sluice demo``, the bench):
each service's own settings, built from the same environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from sluice.common.settings import CommonSettings
from sluice.ingest.settings import IngestSettings
from sluice.router.settings import RouterSettings
from sluice.sender.settings import SenderSettings

S = TypeVar("S", bound=CommonSettings)


@dataclass(frozen=True)
class StackSettings:
    """The three services' settings; the common part is the same in each."""

    ingest: IngestSettings
    router: RouterSettings
    sender: SenderSettings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StackSettings:
        """Each service's settings from one environment (unknown SLUICE_* is an error)."""
        return cls(
            ingest=IngestSettings.from_env(env),
            router=RouterSettings.from_env(env, check_unknown=False),
            sender=SenderSettings.from_env(env, check_unknown=False),
        )

    @classmethod
    def of(cls, **values: Any) -> StackSettings:
        """Settings from keyword values, each handed to the services that know it."""
        return cls(
            ingest=_only_known(IngestSettings, values),
            router=_only_known(RouterSettings, values),
            sender=_only_known(SenderSettings, values),
        )

    @property
    def common(self) -> CommonSettings:
        """The common part (identical in all three)."""
        return self.ingest

    def with_common(self, **changes: Any) -> StackSettings:
        """The same stack with common settings (database_url, redis_url...) changed."""
        return StackSettings(
            ingest=replace(self.ingest, **changes),
            router=replace(self.router, **changes),
            sender=replace(self.sender, **changes),
        )


def _only_known(cls: type[S], values: Mapping[str, Any]) -> S:
    names = set(cls.__dataclass_fields__)
    unknown = [k for k in values if not any(k in c.__dataclass_fields__ for c in _CLASSES)]
    if unknown:
        raise TypeError(f"unknown settings {unknown}")
    settings = cls(**{k: v for k, v in values.items() if k in names})
    settings.validate()
    return settings


_CLASSES = (IngestSettings, RouterSettings, SenderSettings)
