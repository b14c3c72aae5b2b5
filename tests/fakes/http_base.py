"""A small aiohttp server on a free loopback port, with the faults the adapters must
classify: a held answer (the client times out after the request arrived) and a cut
connection after the request was processed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

from aiohttp import web


class FakeHttpServer:
    """Base of the Resend and SendGrid fakes: ``url`` once started; faults by count."""

    def __init__(self) -> None:
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.hold_next = 0  # answer the next N requests only after hold_seconds
        self.hold_seconds = 5.0
        self.cut_next = 0  # process the next N requests, then cut the connection
        self.status_next: list[int] = []  # answer the next requests with these statuses
        self.requests: list[dict[str, Any]] = []  # every request: path, headers, body
        self._window = 0
        self._window_count = 0
        self._released = asyncio.Event()  # set on stop: held answers end at once

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeHttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def take_window(self, limit: int) -> tuple[bool, int, float]:
        """A fixed one-second window of requests: (allowed, remaining, seconds to reset)."""
        now = time.time()
        second = int(now)
        if second != self._window:
            self._window, self._window_count = second, 0
        reset = second + 1 - now
        if limit and self._window_count >= limit:
            return False, 0, reset
        self._window_count += 1
        return True, max(0, limit - self._window_count), reset

    async def after(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """Applies the held-answer and cut-connection faults to a processed request."""
        if self.cut_next:
            self.cut_next -= 1
            assert request.transport is not None
            request.transport.close()
            return response
        if self.hold_next:
            self.hold_next -= 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), self.hold_seconds)
        return response
