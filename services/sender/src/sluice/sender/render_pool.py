"""Rendering off the event loop, in worker processes with hard budgets.

A template can be made to loop for hours (two nested ``range(100000)``) or to allocate
gigabytes in one C call (``'x'|center(10**9)``). Neither may stall the sender's event loop,
its health checks or other callers' batches, so every render runs in a worker process:

- each message has a time budget, enforced inside the worker by a timer signal that raises
  between bytecodes (``_Timeout`` is a ``BaseException``, so template code cannot catch it);
- the worker's address space is capped (``RLIMIT_AS``), so a huge allocation fails with
  ``MemoryError`` inside the worker instead of growing the sender;
- the parent waits at most ``batch budget + grace`` for a batch; a worker stuck past that (in
  a C call no signal interrupts) is killed and the pool rebuilt.

A template that exceeds its time budget is remembered (by content hash) as too costly, so
later batches of it fail at once without taking a worker: a permanent failure of that
template, never retried, never stalling others. Workers are started with ``spawn`` (gRPC
and fork do not mix) and warmed at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import multiprocessing
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from sluice.common.errors import Unavailable
from sluice.sender.render import RenderedMessage, RenderError, Template
from sluice.sender.render_worker import RenderBudget, Wire, init_worker, render_batch, warm
from sluice.sender.settings import SenderSettings

__all__ = ["RenderBudget", "RenderPool", "render_budget"]

log = logging.getLogger("sluice.sender.render")

_POISON_CACHE = 1024


def render_budget(settings: SenderSettings) -> RenderBudget:
    """The budget the sender's settings ask for."""
    return RenderBudget(
        message_seconds=settings.render_timeout_seconds,
        batch_seconds=settings.render_batch_timeout_seconds,
        max_output_chars=settings.render_max_output_chars,
        memory_bytes=settings.render_memory_mb * 1024 * 1024,
    )


class RenderPool:
    """Renders batches in ``workers`` processes within ``budget``; see the module docstring."""

    def __init__(self, workers: int = 2, budget: RenderBudget | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._workers = workers
        self._budget = budget or RenderBudget()
        self._poisoned: OrderedDict[bytes, str] = OrderedDict()
        self._pool = self._new_pool()
        # Manager threads of pools killed by a restart, which ``aclose`` still joins.
        self._retired: list[threading.Thread] = []

    @property
    def budget(self) -> RenderBudget:
        """The budgets every render runs under."""
        return self._budget

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self._workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(self._budget, os.getpid()),
        )

    async def start(self) -> None:
        """Starts every worker now, so the first batch does not pay for process start-up."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._pool, warm) for _ in range(self._workers))
        )

    async def render(
        self, template: Template, variables: Sequence[Mapping[str, str]]
    ) -> list[RenderedMessage | RenderError]:
        """One result per message, in order: the rendered message or why it cannot be."""
        if not variables:
            return []
        key = _content_key(template)
        poisoned = self._poisoned.get(key)
        if poisoned is not None:
            return [RenderError(poisoned) for _ in variables]
        wires, over_budget = await self._run(template, [dict(v) for v in variables])
        if over_budget:
            reason = next(w for w in wires if isinstance(w, str))
            self._poison(key, reason)
        return [
            RenderError(w) if isinstance(w, str) else RenderedMessage(w[0], w[1], w[2])
            for w in wires
        ]

    async def _run(
        self, template: Template, variables: list[dict[str, str]]
    ) -> tuple[list[Wire], bool]:
        pool = self._pool
        # Grace beyond the batch budget covers queueing behind other batches and a loaded box,
        # and stays under the router's default SendBatch timeout (10 s).
        limit = self._budget.batch_seconds + 2.0
        try:
            # ``submit`` itself raises BrokenProcessPool once a worker died while idle.
            future = pool.submit(render_batch, template, variables, self._budget)
            return await asyncio.wait_for(asyncio.wrap_future(future), limit)
        except TimeoutError:
            log.warning("render worker stuck past its budget; restarting the pool")
            self._restart(pool)
            reason = "template exceeded the hard render budget (worker killed)"
            return [reason] * len(variables), True
        except BrokenProcessPool as exc:
            # A worker died (killed by the kernel, or by a restart for another batch): not
            # this template's fault, so the caller retries it later without an attempt.
            self._restart(pool)
            raise Unavailable("render worker restarted; retry the batch") from exc

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        if self._pool is broken:
            self._pool = self._new_pool()
        thread = _kill(broken)
        # Only threads still running are kept, so a sender restarting its pool often (one
        # stuck template after another) does not hold on to every thread it ever had.
        self._retired = [t for t in (*self._retired, thread) if t is not None and t.is_alive()]

    def _poison(self, key: bytes, reason: str) -> None:
        self._poisoned[key] = reason
        while len(self._poisoned) > _POISON_CACHE:
            self._poisoned.popitem(last=False)

    async def aclose(self) -> None:
        """Stops the workers without waiting for renders in flight, and waits (briefly) for
        each executor's manager thread to finish.

        Left running, a manager thread closes its wake-up pipe while the interpreter's exit
        hook writes to it: on Python 3.11 that race prints ``OSError: [Errno 9] Bad file
        descriptor`` from ``concurrent.futures`` as the sender exits. The workers are already
        killed, so the join takes milliseconds; it runs off the event loop all the same.
        """
        threads = [*self._retired, _kill(self._pool)]
        self._retired.clear()
        try:
            await asyncio.wait_for(asyncio.to_thread(_join, threads), _JOIN_SECONDS)
        except TimeoutError:
            log.warning("render pool threads still running %.0f s after close", _JOIN_SECONDS)


_JOIN_SECONDS = 10.0


def _kill(pool: ProcessPoolExecutor) -> threading.Thread | None:
    """Kills the pool's workers and shuts it down without waiting; returns its manager
    thread (which ``shutdown`` forgets) so the caller can join it."""
    # The executor has no public way to kill its workers; terminate them before shutdown so a
    # stuck render cannot hold shutdown (or the pool restart) hostage.
    thread: threading.Thread | None = getattr(pool, "_executor_manager_thread", None)
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        with contextlib.suppress(Exception):
            process.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    return thread


def _join(threads: Sequence[threading.Thread | None]) -> None:
    for thread in threads:
        if thread is not None:
            thread.join()


def _content_key(template: Template) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for part in (template.subject, template.html_body, template.text_body):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.digest()
