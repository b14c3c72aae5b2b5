"""The typed settings of each provider kind (the ``[providers.settings]`` table), and the
strict parsing every table of the providers file goes through.

Strict means: an unknown key is an error naming it (with the closest known key), a value
of the wrong type is an error naming the key and the type it needs (``enabled = "false"``
is a string, not a boolean; ``burst = 2.5`` is not an integer), and nothing is coerced.
A typo must fail start-up, never quietly drop a setting such as a rate limit.

Credentials are ``Secret`` references: for a secret named ``api_key`` the table may give
``api_key`` (inline, for local use), ``api_key_file`` (a mounted secret file) or
``api_key_env`` (an environment variable's name), at most one of them. They are resolved
only by the sender when it builds its adapters, so the router, which reads the same file,
needs no credentials; their values never appear in a repr or a log line.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from sluice.common.errors import ConfigError

SECRET_SOURCES = ("", "_file", "_env")
_S = TypeVar("_S", bound="KindSettings")
_SOURCE_OF_SUFFIX: dict[str, Literal["value", "file", "env"]] = {
    "": "value",
    "_file": "file",
    "_env": "env",
}


@dataclass(frozen=True)
class Secret:
    """Where one credential comes from: ``source`` is ``value``, ``file`` or ``env``.

    ``repr`` shows the file path or variable name, never an inline value; ``reveal``
    reads the credential (at start-up, by the sender only).
    """

    source: Literal["value", "file", "env"]
    ref: str

    def __repr__(self) -> str:
        shown = "***" if self.source == "value" else self.ref
        return f"Secret({self.source}={shown})"

    __str__ = __repr__

    def reveal(self, environ: Mapping[str, str], where: str = "secret") -> str:
        """The credential itself; ``ConfigError`` when its file or variable is missing or empty."""
        if self.source == "value":
            value = self.ref
        elif self.source == "env":
            if self.ref not in environ:
                raise ConfigError(f"{where}: environment variable {self.ref} is not set")
            value = environ[self.ref]
        else:
            try:
                value = Path(self.ref).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read secret file {self.ref}: {exc}") from exc
        value = value.strip()
        if not value:
            raise ConfigError(f"{where}: the {self.source} {self._name()} is empty")
        return value

    def _name(self) -> str:
        return "value" if self.source == "value" else self.ref


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return "a list of strings"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def check_value(value: Any, tp: Any, where: str) -> Any:
    """``value`` if it has type ``tp`` (bool, int, float, str, Literal, tuple[str, ...]),
    else ``ConfigError`` naming ``where``. Integers are taken as floats; nothing else is
    converted. Lists come back as tuples."""
    ok: bool
    if get_origin(tp) is Literal:
        ok = isinstance(value, str) and value in get_args(tp)
    elif get_origin(tp) is tuple:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if ok:
            return tuple(value)
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            return float(value)
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a field type this parser does not know is our bug
        raise TypeError(f"unsupported settings type {tp!r}")
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(
        type(value), type(value).__name__
    )
    return f"{kind} {value!r}" if not isinstance(value, dict | list) else kind


def reject_unknown(raw: Mapping[str, Any], known: list[str], where: str) -> None:
    """``ConfigError`` for the first key of ``raw`` not in ``known``, with a suggestion."""
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}{hint}; known keys: {', '.join(sorted(known))}"
            )


def _is_secret(tp: Any) -> bool:
    if tp is Secret:
        return True
    return get_origin(tp) in (Union, types.UnionType) and Secret in get_args(tp)


def parse_settings(cls: type[_S], raw: Any, where: str) -> _S:
    """Builds ``cls`` from one TOML table, strictly (see the module docstring)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    known: list[str] = []
    values: dict[str, Any] = {}
    for f in fields(cls):
        tp = hints[f.name]
        required = f.default is MISSING and f.default_factory is MISSING
        if _is_secret(tp):
            keys = [f.name + suffix for suffix in SECRET_SOURCES]
            known.extend(keys)
            given = [k for k in keys if k in raw]
            if len(given) > 1:
                raise ConfigError(f"{where}: give only one of {', '.join(given)}")
            if given:
                key = given[0]
                ref = check_value(raw[key], str, f"{where}.{key}")
                source = _SOURCE_OF_SUFFIX[key[len(f.name) :]]
                values[f.name] = Secret(source, ref)
            elif required:
                raise ConfigError(f"{where}: missing {' or '.join(keys)}")
            continue
        known.append(f.name)
        if f.name in raw:
            values[f.name] = check_value(raw[f.name], tp, f"{where}.{f.name}")
        elif required:
            raise ConfigError(f"{where}: missing required key {f.name!r}")
    reject_unknown(raw, known, where)
    settings = cls(**values)
    settings.check(where)
    return settings


def _non_negative(where: str, **numbers: float) -> None:
    for key, value in numbers.items():
        if value < 0:
            raise ConfigError(f"{where}.{key}: must not be negative, got {value}")


def _fraction(where: str, **numbers: float) -> None:
    for key, value in numbers.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"{where}.{key}: must be between 0 and 1, got {value}")


def _positive(where: str, **numbers: float) -> None:
    for key, value in numbers.items():
        if value <= 0:
            raise ConfigError(f"{where}.{key}: must be greater than 0, got {value}")


def _http_url(where: str, key: str, url: str) -> None:
    if not url.startswith(("https://", "http://")):
        raise ConfigError(f"{where}.{key}: must be an http(s) URL, got {url!r}")


@dataclass(frozen=True)
class KindSettings:
    """Base of the per-kind settings; ``check`` validates ranges after the types."""

    kind: ClassVar[str] = ""

    def check(self, where: str) -> None:
        """Raises ``ConfigError`` for values of the right type but out of range."""


@dataclass(frozen=True)
class SandboxSettings(KindSettings):
    """A provider that sends nothing: outcomes by recipient domain, plus injection.

    ``rate`` (messages per second per sender process, 0 = none) makes it answer
    ``throttled`` past that rate like a provider enforcing its own limit;
    ``failure_rate``, ``throttle_rate`` and ``unknown_rate`` inject those outcomes at
    random; ``keep_last`` keeps that many rendered messages in memory for tests and preview.
    """

    kind: ClassVar[str] = "sandbox"

    fail_domains: tuple[str, ...] = ("fail.sandbox.example",)
    flaky_domains: tuple[str, ...] = ("flaky.sandbox.example",)
    latency_ms: float = 0.0
    record_ids: bool = True
    rate: float = 0.0
    failure_rate: float = 0.0
    throttle_rate: float = 0.0
    unknown_rate: float = 0.0
    throttle_retry_after: float = 1.0
    keep_last: int = 0
    seed: int = 0

    def check(self, where: str) -> None:
        _non_negative(
            where,
            latency_ms=self.latency_ms,
            rate=self.rate,
            throttle_retry_after=self.throttle_retry_after,
            keep_last=self.keep_last,
        )
        _fraction(
            where,
            failure_rate=self.failure_rate,
            throttle_rate=self.throttle_rate,
            unknown_rate=self.unknown_rate,
        )
        if self.failure_rate + self.throttle_rate + self.unknown_rate > 1:
            raise ConfigError(f"{where}: failure, throttle and unknown rates add up past 1")


@dataclass(frozen=True)
class SesSettings(KindSettings):
    """Amazon SES (API v2). Without explicit keys, the AWS default credential chain
    applies (``AWS_*`` variables, web identity, instance roles)."""

    kind: ClassVar[str] = "ses"

    region: str
    endpoint_url: str = ""
    configuration_set: str = ""
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    session_token: Secret | None = None
    timeout_seconds: float = 10.0
    max_connections: int = 10
    read_quota: bool = False

    def check(self, where: str) -> None:
        if not self.region:
            raise ConfigError(f"{where}.region: must not be empty")
        if self.endpoint_url:
            _http_url(where, "endpoint_url", self.endpoint_url)
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ConfigError(f"{where}: give access_key_id and secret_access_key together")
        _positive(where, timeout_seconds=self.timeout_seconds, max_connections=self.max_connections)


@dataclass(frozen=True)
class ResendSettings(KindSettings):
    """Resend's HTTP API; ``batch_validation`` is sent as its ``x-batch-validation``."""

    kind: ClassVar[str] = "resend"

    api_key: Secret
    base_url: str = "https://api.resend.com"
    timeout_seconds: float = 10.0
    max_connections: int = 10
    batch_validation: Literal["strict", "permissive"] = "permissive"

    def check(self, where: str) -> None:
        _http_url(where, "base_url", self.base_url)
        _positive(where, timeout_seconds=self.timeout_seconds, max_connections=self.max_connections)


@dataclass(frozen=True)
class SendGridSettings(KindSettings):
    """SendGrid's v3 HTTP API."""

    kind: ClassVar[str] = "sendgrid"

    api_key: Secret
    base_url: str = "https://api.sendgrid.com"
    timeout_seconds: float = 10.0
    max_connections: int = 10

    def check(self, where: str) -> None:
        _http_url(where, "base_url", self.base_url)
        _positive(where, timeout_seconds=self.timeout_seconds, max_connections=self.max_connections)


_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class SmtpSettings(KindSettings):
    """An SMTP relay. ``tls``: ``none``, ``starttls`` (required, not opportunistic) or
    ``implicit`` (TLS from the first byte, usually port 465)."""

    kind: ClassVar[str] = "smtp"

    host: str
    port: int = 587
    tls: Literal["none", "starttls", "implicit"] = "starttls"
    username: str = ""
    password: Secret | None = None
    pool_size: int = 4
    timeout_seconds: float = 30.0
    ca_file: str = ""
    validate_certs: bool = True
    message_id_domain: str = ""
    local_hostname: str = ""

    def check(self, where: str) -> None:
        if not self.host:
            raise ConfigError(f"{where}.host: must not be empty")
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}.port: must be 1-65535, got {self.port}")
        if bool(self.username) != (self.password is not None):
            raise ConfigError(f"{where}: give username and password together")
        if self.username and self.tls == "none" and self.host not in _LOOPBACK:
            raise ConfigError(f"{where}: tls = 'none' would send the password in clear")
        _positive(where, pool_size=self.pool_size, timeout_seconds=self.timeout_seconds)


KIND_SETTINGS: dict[str, type[KindSettings]] = {
    cls.kind: cls
    for cls in (SandboxSettings, SesSettings, ResendSettings, SendGridSettings, SmtpSettings)
}
