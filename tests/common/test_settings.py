"""Settings are composed per service, and a typo in a variable stops start-up."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sluice.common.errors import ConfigError
from sluice.common.settings import CommonSettings, unknown_variables
from sluice.ingest.settings import IngestSettings
from sluice.router.settings import RouterSettings
from sluice.sender.settings import SenderSettings


def test_a_misspelt_variable_stops_start_up_and_names_the_likely_one() -> None:
    with pytest.raises(ConfigError) as caught:
        RouterSettings.from_env({"SLUICE_ROUTER_BACH_SIZE": "100"})
    assert "SLUICE_ROUTER_BACH_SIZE" in caught.value.message
    assert "did you mean SLUICE_ROUTER_BATCH_SIZE" in caught.value.message


def test_another_services_variable_is_not_an_error() -> None:
    # One ConfigMap configures the whole stack: ingest must start with router knobs in it.
    env = {"SLUICE_ROUTER_BATCH_SIZE": "100", "SLUICE_INGEST_PORT": "6000"}
    assert unknown_variables(env) == []
    assert IngestSettings.from_env(env).ingest_port == 6000
    assert RouterSettings.from_env(env).router_batch_size == 100


def test_each_service_has_only_its_own_knobs() -> None:
    def names(cls: type[CommonSettings]) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    common = names(CommonSettings)
    ingest, router, sender = (
        names(c) - common for c in (IngestSettings, RouterSettings, SenderSettings)
    )
    assert "router_batch_size" in router
    assert "router_batch_size" not in ingest | sender
    assert "default_deadline_seconds" in ingest
    assert "default_deadline_seconds" not in router
    assert "sender_port" in sender
    assert "sender_port" not in ingest


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"SLUICE_LOG_LEVEL": "LOUD"}, "SLUICE_LOG_LEVEL"),
        ({"SLUICE_DB_POOL_SIZE": "zero"}, "SLUICE_DB_POOL_SIZE"),
        ({"SLUICE_METRICS_PORT": "70000"}, "SLUICE_METRICS_PORT"),
        (
            {"SLUICE_LEASE_SECONDS": "1", "SLUICE_SENDER_TIMEOUT_SECONDS": "2"},
            "SLUICE_SENDER_TIMEOUT",
        ),
    ],
)
def test_bad_values_name_their_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        RouterSettings.from_env(env)


def test_secrets_can_come_from_mounted_files(tmp_path: Path) -> None:
    secret = tmp_path / "database-url"
    secret.write_text("postgresql://sluice:s3cret@db:5432/sluice\n")
    settings = IngestSettings.from_env({"DATABASE_URL_FILE": str(secret)})
    assert settings.database_url == "postgresql://sluice:s3cret@db:5432/sluice"
    with pytest.raises(ConfigError, match="REDIS_URL_FILE"):
        IngestSettings.from_env({"REDIS_URL_FILE": str(tmp_path / "missing")})
