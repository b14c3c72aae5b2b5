"""Structured logging with request and trace ids, and recipient redaction.

Log records carry the current trace and span ids (from OpenTelemetry) and the request id
bound with :func:`bind_request_id`. Recipient addresses go through :func:`redact_email`
before they reach a log call: the local part is replaced by a short keyed hash so two log
lines about the same recipient can be matched without showing the address.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import trace

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("sluice_request_id", default="")

# Fixed salt: stable across processes so operators can correlate lines; the hash is short
# and salted so a log reader cannot confirm a guessed address without the code.
_SALT = b"sluice-log-redaction-v1"


def redact_email(address: str) -> str:
    """``alice@example.com`` -> ``h:3f2a9c1b@example.com``; never the local part in clear."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        local, domain = address, ""
    digest = hashlib.blake2s(local.encode("utf-8", "replace"), key=_SALT, digest_size=4).hexdigest()
    return f"h:{digest}@{domain}" if domain else f"h:{digest}"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (database and Redis URLs in logs,
    errors and banners)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def bind_request_id(request_id: str) -> contextvars.Token[str]:
    """Sets the request id carried by every log record of the current task."""
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token[str]) -> None:
    """Restores the request id bound before :func:`bind_request_id`."""
    _request_id.reset(token)


class ContextFilter(logging.Filter):
    """Adds the current trace id, span id and request id to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else ""
        record.request_id = _request_id.get()
        return True


_RESERVED = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "trace_id",
    "span_id",
    "request_id",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids, and ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "trace_id", "span_id"):
            value = getattr(record, key, "")
            if value:
                out[key] = value
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local runs, with the same ids and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%H:%M:%S")
        base = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extras = [
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _RESERVED and not k.startswith("_")
        ]
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            extras.append(f"trace={trace_id[:16]}")
        request_id = getattr(record, "request_id", "")
        if request_id:
            extras.append(f"req={request_id}")
        line = base + (" " + " ".join(extras) if extras else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "INFO", fmt: str = "text", *, service: str = "") -> None:
    """Configures the root logger once per process (stderr, JSON or text)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if service:
        logging.getLogger("sluice").info("logging configured", extra={"service": service})
