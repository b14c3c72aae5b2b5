"""Bearer-token authentication and scope checks for every RPC but health and reflection.

Callers send ``authorization: Bearer <token>`` metadata. Sluice never holds tokens in
clear: the tokens file (``SLUICE_AUTH_TOKENS_FILE``, TOML, mounted from a secret) lists the
SHA-256 of each token with a name and its scopes::

    [[tokens]]
    name = "orders-service"            # shows in logs and metrics instead of the token
    sha256 = "9f86d081884c7d65..."     # sha256 of the token, hex (`sluice token` makes one)
    scopes = ["submit", "read"]

Scopes: ``submit`` (SubmitIntent*), ``read`` (Get*, List*, Watch*), ``admin`` (everything
else of ingest and the router: templates, suppression, cancellation, pause, replay) and
``send`` (the sender's SendBatch, held only by routers; its GetCapacity is ``read``).
``admin`` implies ``submit`` and ``read``; nothing implies ``send``.

Rotation without downtime: list the new token beside the old one, roll the clients, then
remove the old one. The file is re-read when it changes (checked at most every
``reload_seconds``), so no restart is needed. A missing or unknown token is
UNAUTHENTICATED, a known token without the scope PERMISSION_DENIED; both are counted in
``sluice_auth_refusals_total`` and logged with the token's name, never the token.

Tokens are random 256-bit strings, so a plain SHA-256 is the right hash: there is nothing to
brute-force, and a slow password hash would only cost CPU on every call.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from sluice.common.errors import ConfigError, PermissionDenied, SluiceError, Unauthenticated
from sluice.common.metrics import Metrics

log = logging.getLogger("sluice.auth")

SCOPES = ("submit", "read", "admin", "send")
#: Methods anyone may call: health checks (probes, load balancers) and reflection.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_IMPLIED = {"admin": frozenset({"admin", "submit", "read"})}


def hash_token(token: str) -> str:
    """The hex SHA-256 a tokens file lists for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A new random token (256 bits, URL-safe)."""
    return "slc_" + secrets.token_urlsafe(32)


def required_scope(method: str) -> str | None:
    """The scope a full method name needs; None for the open ones."""
    if method.startswith(OPEN_PREFIXES):
        return None
    _, _, name = method.rpartition("/")
    if method == "/sluice.v1.SenderService/SendBatch":
        return "send"
    if name.startswith("Submit"):
        return "submit"
    if name.startswith(("Get", "List", "Watch", "Check", "Preview", "Render")):
        return "read"
    return "admin"


@dataclass(frozen=True)
class Caller:
    """A known token's identity."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """True when the caller holds ``scope`` (directly or implied)."""
        return any(scope in _IMPLIED.get(s, frozenset({s})) for s in self.scopes)


def parse_tokens(document: Mapping[str, Any], source: str) -> dict[str, Caller]:
    """Hash -> caller from a parsed tokens document; ConfigError naming what is wrong."""
    raw = document.get("tokens")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: expected a non-empty [[tokens]] array")
    unknown_top = set(document) - {"tokens"}
    if unknown_top:
        raise ConfigError(f"{source}: unknown keys {sorted(unknown_top)}")
    out: dict[str, Caller] = {}
    for i, entry in enumerate(raw):
        where = f"{source}: tokens[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table")
        unknown = set(entry) - {"name", "sha256", "scopes"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        name, digest, scopes = entry.get("name"), entry.get("sha256"), entry.get("scopes")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: name must be a non-empty string")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ConfigError(f"{where} ({name}): sha256 must be 64 hex characters")
        try:
            bytes.fromhex(digest)
        except ValueError:
            raise ConfigError(f"{where} ({name}): sha256 is not hex") from None
        if not isinstance(scopes, list) or not scopes or not all(s in SCOPES for s in scopes):
            raise ConfigError(f"{where} ({name}): scopes must be a list of {', '.join(SCOPES)}")
        if digest.lower() in out:
            raise ConfigError(f"{where} ({name}): the same token is listed twice")
        out[digest.lower()] = Caller(name, frozenset(scopes))
    return out


class TokenStore:
    """The tokens file, re-read when it changes."""

    def __init__(self, path: str | Path, *, reload_seconds: float = 5.0) -> None:
        self.path = Path(path)
        self.reload_seconds = reload_seconds
        self._callers: dict[str, Caller] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._load(strict=True)

    def _load(self, *, strict: bool) -> None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            callers = parse_tokens(
                tomllib.loads(self.path.read_text(encoding="utf-8")), str(self.path)
            )
        except (OSError, tomllib.TOMLDecodeError, ConfigError) as exc:
            if strict:
                raise ConfigError(f"auth tokens file {self.path}: {exc}") from exc
            # A half-written or broken file during rotation: keep the tokens we have.
            log.warning(
                "auth tokens file %s not reloaded, keeping the old tokens: %s", self.path, exc
            )
            return
        self._callers, self._stamp = callers, stamp
        log.info("auth: %d token(s) loaded from %s", len(callers), self.path)

    def lookup(self, token: str) -> Caller | None:
        """The caller a token belongs to, or None."""
        now = time.monotonic()
        if now - self._checked >= self.reload_seconds:
            self._checked = now
            self._load(strict=False)
        return self._callers.get(hash_token(token))


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without a valid token holding the method's scope.

    It sits inside the error interceptor: a refused call gets a handler of the same shape
    that raises the refusal, which the error interceptor maps to UNAUTHENTICATED or
    PERMISSION_DENIED with ErrorInfo like any other error.
    """

    def __init__(self, store: TokenStore, metrics: Metrics | None = None) -> None:
        self._store = store
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        scope = required_scope(method)
        if handler is None or scope is None:
            return handler
        refusal = self._check(dict(handler_call_details.invocation_metadata or ()), scope, method)
        if refusal is None:
            return handler
        return _refusing(handler, refusal)

    def _check(self, metadata: dict[str, Any], scope: str, method: str) -> SluiceError | None:
        header = metadata.get("authorization", "")
        token = (
            header[7:].strip()
            if isinstance(header, str) and header[:7].lower() == "bearer "
            else ""
        )
        caller = self._store.lookup(token) if token else None
        if caller is None:
            reason = "missing" if not token else "unknown"
            self._refused(reason)
            log.warning("auth: %s token for %s", reason, method)
            return Unauthenticated(
                "a valid bearer token is required (metadata 'authorization: Bearer <token>')"
            )
        if not caller.allows(scope):
            self._refused("scope")
            log.warning("auth: %s lacks scope %s for %s", caller.name, scope, method)
            return PermissionDenied(
                f"token {caller.name!r} lacks scope {scope!r}", metadata={"scope": scope}
            )
        return None

    def _refused(self, reason: str) -> None:
        if self._metrics is not None and self._metrics.enabled:
            self._metrics.auth_refusals.labels(self._metrics.service, reason).inc()


def _refusing(handler: grpc.RpcMethodHandler, error: SluiceError) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: Any) -> Any:
        raise error

    async def refuse_stream(request: Any, context: Any) -> AsyncIterator[Any]:
        if error:  # always: an async generator that raises before its first item
            raise error
        yield None

    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, deserializer, serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, deserializer, serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, deserializer, serializer)


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


class BearerClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Client side: adds the token to every unary call of a channel (router -> sender)."""

    def __init__(self, token: str) -> None:
        self._metadata = bearer(token)

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        metadata = (*(client_call_details.metadata or ()), *self._metadata)
        details = client_call_details._replace(metadata=metadata)
        return await continuation(details, request)


def client_interceptors(token: str) -> list[BearerClientInterceptor]:
    """Channel interceptors that send ``token`` (none for an empty token)."""
    return [BearerClientInterceptor(token)] if token else []


def read_token_file(path: str, *, what: str) -> str:
    """A token from a mounted secret file ("" when ``path`` is empty)."""
    if not path:
        return ""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from exc
    if not token:
        raise ConfigError(f"{what} {path} is empty")
    return token


def tokens_file_text(entries: Mapping[str, tuple[str, ...]], tokens: Mapping[str, str]) -> str:
    """A tokens file listing ``tokens`` (name -> token) with ``entries`` (name -> scopes)."""
    blocks = []
    for name, scopes in entries.items():
        quoted = ", ".join(f'"{s}"' for s in scopes)
        blocks.append(
            f'[[tokens]]\nname = "{name}"\nsha256 = "{hash_token(tokens[name])}"\n'
            f"scopes = [{quoted}]\n"
        )
    return "\n".join(blocks)
