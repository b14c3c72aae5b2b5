"""The HTTP listener of a service (metrics, webhooks), on aiohttp.

aiohttp because it embeds in an existing asyncio loop as one more listener of a
:class:`~sluice.common.service.Service` (``AppRunner`` + ``TCPSite``: start, stop with a
drain timeout), with no server process or signal handling of its own.

Every HTTP app a listener serves gets ``/healthz`` answered from the listener's own
serving flag, so an HTTP-only probe sees the same NOT_SERVING as gRPC health.
"""

from __future__ import annotations

import errno
import logging
import socket

from aiohttp import web

from sluice.common.metrics import HealthFlag
from sluice.common.service import ListenError

log = logging.getLogger("sluice.http")

#: Requests larger than this are refused with 413 unless an app sets its own limit.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class HttpListener:
    """One aiohttp application bound to ``host:port`` (0 = any free port)."""

    def __init__(
        self,
        name: str,
        app: web.Application,
        host: str,
        port: int,
        *,
        health: HealthFlag | None = None,
    ) -> None:
        self._name = name
        self.app = app
        self.host = host
        self._requested_port = port
        self._port = 0
        self.health = health if health is not None else HealthFlag()
        self._runner: web.AppRunner | None = None

    @property
    def name(self) -> str:
        """The listener's label (``metrics``, ``webhooks``)."""
        return self._name

    @property
    def port(self) -> int:
        """The bound port (0 before start)."""
        return self._port

    async def start(self) -> int:
        """Binds and serves; raises ListenError when the address cannot be bound."""
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await runner.setup()
        sock = socket.socket(
            socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM
        )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
        except OSError as exc:
            sock.close()
            await runner.cleanup()
            raise ListenError(
                bind_message(self._name, self.host, self._requested_port, exc)
            ) from exc
        site = web.SockSite(runner, sock)
        await site.start()
        self._runner = runner
        self._port = sock.getsockname()[1]
        return self._port

    async def set_serving(self, serving: bool) -> None:
        """What ``/healthz`` answers."""
        self.health.serving = serving

    async def stop(self, grace: float) -> None:
        """Stops accepting and gives in-flight requests up to ``grace`` seconds."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        runner._shutdown_timeout = grace
        await runner.cleanup()


def bind_message(name: str, host: str, port: int, exc: OSError) -> str:
    """The one-line start-up error for a listener that could not bind."""
    if exc.errno == errno.EADDRINUSE:
        return f"{name}: {host}:{port} is already in use (is another Sluice running?)"
    return f"{name}: cannot listen on {host}:{port}: {exc.strerror or exc}"
