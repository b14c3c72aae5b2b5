"""The providers file: every kind is accepted, and typos or wrong types stop start-up
with a message naming the provider and the key (a typo must never remove a rate limit)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sluice.common.errors import ConfigError
from sluice.common.providers import (
    DEFAULT_PROVIDERS,
    ResendSettings,
    Secret,
    SendGridSettings,
    SesSettings,
    SmtpSettings,
    load_providers,
    parse_providers,
)

BASE = """
[[providers]]
name = "main"
kind = "{kind}"
cost_per_thousand = 0.1
sustained_rate = 10
burst = 20
intents = ["marketing"]
{extra}
"""

SETTINGS = {
    "sandbox": "",
    "ses": '[providers.settings]\nregion = "eu-west-1"\nconfiguration_set = "sluice"',
    "resend": '[providers.settings]\napi_key_env = "RESEND_API_KEY"',
    "sendgrid": '[providers.settings]\napi_key_file = "/run/secrets/sendgrid"',
    "smtp": '[providers.settings]\nhost = "smtp.example.com"\nport = 465\ntls = "implicit"',
}


def parse(kind: str = "sandbox", extra: str = "") -> tuple:  # type: ignore[type-arg]
    extra = extra or SETTINGS.get(kind, "")
    # A key the extra lines set replaces the base's (TOML refuses a key given twice).
    redefined = {line.split("=")[0].strip() for line in extra.splitlines() if "=" in line}
    base = "\n".join(
        line for line in BASE.splitlines() if line.split("=")[0].strip() not in redefined
    )
    text = base.format(kind=kind, extra=extra)
    return parse_providers(tomllib.loads(text), "providers.toml")


@pytest.mark.parametrize("kind", ["ses", "resend", "sendgrid", "smtp", "sandbox"])
def test_every_kind_is_accepted_with_its_typed_settings(kind: str) -> None:
    [config] = parse(kind)
    assert config.kind == kind
    assert type(config.settings).kind == kind
    assert (config.sustained_rate, config.burst) == (10.0, 20)


def test_kind_settings_are_typed() -> None:
    [ses] = parse("ses")
    assert isinstance(ses.settings, SesSettings)
    assert (ses.settings.region, ses.settings.configuration_set) == ("eu-west-1", "sluice")
    [smtp] = parse("smtp")
    assert isinstance(smtp.settings, SmtpSettings)
    assert (smtp.settings.port, smtp.settings.tls, smtp.settings.pool_size) == (465, "implicit", 4)
    [resend] = parse("resend")
    assert isinstance(resend.settings, ResendSettings)
    assert resend.settings.api_key == Secret("env", "RESEND_API_KEY")
    [sendgrid] = parse("sendgrid")
    assert isinstance(sendgrid.settings, SendGridSettings)
    assert sendgrid.settings.api_key == Secret("file", "/run/secrets/sendgrid")


def test_shared_fields_default_and_parse() -> None:
    [config] = parse("resend")
    assert (config.verified, config.smtputf8) == (True, False)
    assert (config.requests_per_second, config.request_burst, config.daily_quota) == (0.0, 0, 0)
    [sandbox] = parse("sandbox")
    assert sandbox.smtputf8 is True  # the sandbox takes any address
    [limited] = parse(
        "resend",
        "verified = false\nsmtputf8 = true\nrequests_per_second = 2\nrequest_burst = 2\n"
        "daily_quota = 100\n" + SETTINGS["resend"],
    )
    assert (limited.verified, limited.smtputf8) == (False, True)
    assert (limited.requests_per_second, limited.request_burst, limited.daily_quota) == (
        2.0,
        2,
        100,
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("brust = 30", r"providers\[0\] \('main'\): unknown key 'brust' \(did you mean 'burst'"),
        ("sustained_rte = 5", r"unknown key 'sustained_rte' \(did you mean 'sustained_rate'"),
        ("requests_per_secnd = 2", r"did you mean 'requests_per_second'"),
        ('enabled = "false"', r"\('main'\)\.enabled: expected a boolean, got string 'false'"),
        ("burst = 2.5", r"\.burst: expected an integer, got number 2\.5"),
        ('sustained_rate = "10"', r"\.sustained_rate: expected a number, got string '10'"),
        ("verified = 1", r"\.verified: expected a boolean, got integer 1"),
        ('intents = "marketing"', r"\.intents: expected a list of strings"),
        ("daily_quota = -1", r"\.daily_quota: must not be negative"),
        ("requests_per_second = 5\nrequest_burst = 2", r"requests_per_second 5.0 exceeds"),
        ('[providers.options]\nlatency_ms = "800"', r"'options' is now 'settings'"),
        ("[providers.settings]\nlatncy_ms = 5", r"settings: unknown key 'latncy_ms'"),
        ('[providers.settings]\nlatency_ms = "800"', r"settings\.latency_ms: expected a number"),
        ('[providers.settings]\nrecord_ids = "false"', r"settings\.record_ids: expected a boolean"),
    ],
)
def test_typos_and_wrong_types_name_the_provider_and_key(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse("sandbox", extra + "\n" if "[providers" in extra else extra)


@pytest.mark.parametrize(
    ("kind", "settings", "message"),
    [
        ("ses", "", r"settings: missing required key 'region'"),
        ("ses", 'region = "x"\nregoin = "y"', r"unknown key 'regoin' \(did you mean 'region'"),
        ("ses", 'region = "x"\naccess_key_id = "a"', r"access_key_id and secret_access_key"),
        ("resend", "", r"missing api_key or api_key_file or api_key_env"),
        ("resend", 'api_key = "k"\napi_key_file = "/f"', r"give only one of api_key, api_key_f"),
        ("resend", 'api_key = "k"\nbatch_validation = "lax"', r"one of 'strict', 'permissive'"),
        ("sendgrid", 'api_key = "k"\nbase_url = "api.sendgrid.com"', r"base_url: must be an"),
        ("smtp", 'host = "h"\nport = "25"', r"settings\.port: expected an integer"),
        ("smtp", 'host = "h"\ntls = "ssl"', r"settings\.tls: expected one of"),
        ("smtp", 'host = "h"\nusername = "u"', r"username and password together"),
        ("smtp", 'host = "h"\nusername = "u"\npassword = "p"\ntls = "none"', r"in clear"),
    ],
)
def test_kind_settings_errors(kind: str, settings: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(kind, "[providers.settings]\n" + settings)


def test_unknown_kind_and_top_level_keys() -> None:
    with pytest.raises(ConfigError, match=r"\.kind: expected one of 'sandbox', 'ses'"):
        parse("mailgun", "")
    with pytest.raises(ConfigError, match="unknown key 'provider'"):
        parse_providers({"provider": [], "providers": []})


def test_secrets_never_show_and_resolve_from_file_or_env(tmp_path: Path) -> None:
    [config] = parse("resend", '[providers.settings]\napi_key = "re_supersecret"')
    assert "re_supersecret" not in repr(config)
    assert "re_supersecret" not in str(config.settings)
    assert isinstance(config.settings, ResendSettings)
    assert config.settings.api_key.reveal({}) == "re_supersecret"
    secret_file = tmp_path / "key"
    secret_file.write_text("SG.from-file\n")
    assert Secret("file", str(secret_file)).reveal({}) == "SG.from-file"
    assert Secret("env", "KEY").reveal({"KEY": "from-env"}) == "from-env"
    with pytest.raises(ConfigError, match="KEY is not set"):
        Secret("env", "KEY").reveal({})
    with pytest.raises(ConfigError, match="cannot read secret file"):
        Secret("file", str(tmp_path / "missing")).reveal({})
    with pytest.raises(ConfigError, match="is empty"):
        Secret("env", "KEY").reveal({"KEY": " "})


def test_default_set_and_file_loading(tmp_path: Path) -> None:
    assert load_providers("") == DEFAULT_PROVIDERS
    file = tmp_path / "providers.toml"
    file.write_text(BASE.format(kind="sandbox", extra="brust = 1"))
    with pytest.raises(ConfigError, match=f"{file}: providers\\[0\\] \\('main'\\): unknown key"):
        load_providers(file)
