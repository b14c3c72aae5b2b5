"""An aiohttp application as a :class:`sluice.common.service.Listener`.

Stand-in until ``sluice.common.http.HttpListener`` lands: the same start/stop shape, so the
service wiring swaps one class for the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from aiohttp import web

from sluice.common.service import ListenError


class AppListener:
    """Serves ``app`` on ``host:port`` (0 = a free port) with a bounded stop."""

    def __init__(self, app: web.Application, host: str, port: int, *, name: str) -> None:
        self._app = app
        self._host = host
        self._requested = port
        self._name = name
        self._port = 0
        self._runner: web.AppRunner | None = None
        self.serving = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> int:
        # No access log: unsubscribe tokens travel in the path.
        runner = web.AppRunner(self._app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._requested)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            where = f"{self._host}:{self._requested}"
            raise ListenError(f"{self._name}: cannot listen on {where}: {exc}") from exc
        self._runner = runner
        server = site._server  # aiohttp exposes the bound port nowhere else
        sockets = getattr(server, "sockets", None) or []
        for sock in sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self._port = int(sock.getsockname()[1])
                break
        return self._port

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving

    async def stop(self, grace: float) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runner.cleanup(), timeout=max(0.5, grace))
