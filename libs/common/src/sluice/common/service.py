"""The one shape every Sluice service has: listeners, supervised tasks, one bounded stop.

A :class:`Service` owns any number of listeners (gRPC, HTTP) and background tasks. Its
resources (pool, Redis, HTTP and AWS clients) are opened by the caller in one
``AsyncExitStack`` and handed to the service's builder, so ``sluice serve``, ``sluice dev``,
the benchmark and the tests all build a service the same way.

Life of a service::

    start()       every listener binds (a port in use is a ListenError), start hooks run
                  (the router's dispatcher), then SERVING
    run           supervised tasks run; one that ends unexpectedly marks the service failed:
                  health turns NOT_SERVING and ``failed`` is set, so ``sluice serve`` exits
                  non-zero and the orchestrator restarts the process
    stop(grace)   NOT_SERVING on every listener -> drain hooks (the router gives back its
                  leases) -> listeners stop accepting and drain in-flight calls -> remaining
                  tasks cancelled; all within one ``grace`` budget. Resources close after,
                  in reverse order, with the caller's exit stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from sluice.common.errors import SluiceError

log = logging.getLogger("sluice.service")

DrainHook = Callable[[float], Awaitable[None]]


class ListenError(SluiceError):
    """A listener could not bind its address (the port is in use, or the host is wrong)."""

    reason = "LISTEN"


class Listener(Protocol):
    """Something that accepts connections: a gRPC server or an HTTP app."""

    @property
    def name(self) -> str:
        """A short label for logs (``grpc``, ``metrics``, ``webhooks``)."""
        ...

    @property
    def port(self) -> int:
        """The bound port (0 before :meth:`start`)."""
        ...

    async def start(self) -> int:
        """Binds and starts accepting; returns the bound port; raises ListenError."""
        ...

    async def set_serving(self, serving: bool) -> None:
        """What health checks on this listener answer."""
        ...

    async def stop(self, grace: float) -> None:
        """Stops accepting and drains in-flight requests for up to ``grace`` seconds."""
        ...


class ServiceFailed(SluiceError):
    """A supervised task of a running service ended unexpectedly."""

    reason = "SERVICE_FAILED"


class Service:
    """Listeners, supervised background tasks and drain hooks, with one stop sequence."""

    def __init__(self, name: str, *, grace: float = 10.0) -> None:
        self.name = name
        self.grace = grace
        self.listeners: list[Listener] = []
        self._drain_hooks: list[DrainHook] = []
        self._start_hooks: list[Callable[[], Awaitable[None]]] = []
        self._watched: list[asyncio.Task[object]] = []
        self._stopping = False
        self._started = False
        #: Set when a supervised task ended while the service was not stopping.
        self.failed = asyncio.Event()
        self.error: BaseException | None = None

    # ---- building ---------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> Listener:
        """Adds a listener; the first one added is the service's main (gRPC) listener."""
        self.listeners.append(listener)
        return listener

    def on_drain(self, hook: DrainHook) -> None:
        """Runs ``hook(remaining_grace)`` after NOT_SERVING and before listeners stop."""
        self._drain_hooks.append(hook)

    def on_start(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Runs ``hook()`` once every listener is up (e.g. the router's dispatcher)."""
        self._start_hooks.append(hook)

    def watch(self, task: asyncio.Task[object]) -> None:
        """Supervises a task: if it ends before :meth:`stop`, the service has failed."""
        self._watched.append(task)
        task.add_done_callback(self._task_done)

    def spawn(self, coro: Awaitable[object], *, name: str) -> asyncio.Task[object]:
        """Starts ``coro`` as a supervised task."""
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        task.set_name(name)
        self.watch(task)
        return task

    # ---- running ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The main listener's bound port."""
        return self.listeners[0].port if self.listeners else 0

    def listener(self, name: str) -> Listener:
        """The listener called ``name``; KeyError when there is none."""
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)

    async def start(self) -> None:
        """Binds every listener, then marks them SERVING. On a bind error the listeners
        already started are stopped again before the error propagates."""
        started: list[Listener] = []
        try:
            for listener in self.listeners:
                await listener.start()
                started.append(listener)
        except BaseException:
            for listener in reversed(started):
                with contextlib.suppress(Exception):
                    await listener.stop(0)
            raise
        self._started = True
        try:
            for hook in self._start_hooks:
                await hook()
        except BaseException:
            await self.stop()
            raise
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        """Sets every listener's health at once."""
        for listener in self.listeners:
            await listener.set_serving(serving)

    def _task_done(self, task: asyncio.Task[object]) -> None:
        if self._stopping:
            return
        if task.cancelled():
            error: BaseException = ServiceFailed(f"task {task.get_name()} was cancelled")
        else:
            exc = task.exception()
            error = exc if exc is not None else ServiceFailed(f"task {task.get_name()} returned")
        if self.error is None:
            self.error = error
            log.error(
                "%s: supervised task %s ended unexpectedly; the service is failing",
                self.name,
                task.get_name(),
                exc_info=error,
            )
        self.failed.set()
        # Health must say so at once, even before the process gets round to exiting.
        asyncio.get_running_loop().create_task(self.set_serving(False))

    async def stop(self, grace: float | None = None) -> None:
        """The bounded stop sequence (see the module docstring). Safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        budget = self.grace if grace is None else grace
        started = time.monotonic()

        def left() -> float:
            return max(0.0, budget - (time.monotonic() - started))

        if self._started:
            await self.set_serving(False)
        for hook in self._drain_hooks:
            try:
                await hook(left())
            except Exception:
                log.exception("%s: a drain hook failed", self.name)
        for listener in reversed(self.listeners):
            if self._started:
                await listener.stop(max(0.5, left()))
        for task in self._watched:
            task.cancel()
        if self._watched:
            await asyncio.gather(*self._watched, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Service]:
        """Starts the service and stops it (bounded) when the block exits."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    async def wait(self, stop: asyncio.Event) -> None:
        """Returns when ``stop`` is set; raises ServiceFailed when a task died first."""
        stop_wait = asyncio.ensure_future(stop.wait())
        failed_wait = asyncio.ensure_future(self.failed.wait())
        try:
            await asyncio.wait({stop_wait, failed_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            failed_wait.cancel()
        if self.failed.is_set() and not stop.is_set():
            raise ServiceFailed(f"{self.name} failed: {self.error!r}")
