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
import resource
import signal
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from types import FrameType

from sluice.common.errors import Unavailable
from sluice.sender.render import RenderedMessage, Renderer, RenderError, Template
from sluice.sender.settings import SenderSettings

log = logging.getLogger("sluice.sender.render")

# (subject, html, text) on success, the reason on failure: plain tuples pickle fastest.
_Wire = tuple[str, str, str] | str
_POISON_CACHE = 1024


@dataclass(frozen=True, slots=True)
class RenderBudget:
    """What one render may cost. ``message_seconds`` per message, ``batch_seconds`` for a
    whole batch, ``max_output_chars`` per message, ``memory_bytes`` of address space a
    worker may grow by beyond its size at start."""

    message_seconds: float = 0.5
    batch_seconds: float = 5.0
    max_output_chars: int = 1_000_000
    memory_bytes: int = 512 * 1024 * 1024


def render_budget(settings: SenderSettings) -> RenderBudget:
    """The budget the sender's settings ask for."""
    return RenderBudget(
        message_seconds=settings.render_timeout_seconds,
        batch_seconds=settings.render_batch_timeout_seconds,
        max_output_chars=settings.render_max_output_chars,
        memory_bytes=settings.render_memory_mb * 1024 * 1024,
    )


class _Timeout(BaseException):
    """Raised in the worker by the timer; a BaseException so ``except Exception`` in a
    filter or in Jinja's runtime does not swallow it."""


_renderer: Renderer | None = None


def _on_timer(signum: int, frame: FrameType | None) -> None:
    raise _Timeout


def _init_worker(budget: RenderBudget) -> None:
    global _renderer
    _renderer = Renderer(max_output_chars=budget.max_output_chars)
    signal.signal(signal.SIGALRM, _on_timer)
    # The parent handles SIGINT/SIGTERM and shuts the pool down; a worker must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open("/proc/self/statm", encoding="ascii") as statm:  # noqa: PTH123 (a proc file)
        current = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = current + budget.memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _render_in_worker(
    template: Template, variables: Sequence[Mapping[str, str]], budget: RenderBudget
) -> tuple[list[_Wire], bool]:
    """Renders every message; returns the results and whether the time budget ran out.

    Once one message exceeds its budget, or the batch exceeds its own, the rest fail with
    the same reason: the template is at fault, and each would cost another budget."""
    assert _renderer is not None, "worker not initialised"
    out: list[_Wire] = []
    deadline = time.monotonic() + budget.batch_seconds
    for i, values in enumerate(variables):
        left = deadline - time.monotonic()
        if left <= 0:
            reason = f"template exceeded the batch render budget of {budget.batch_seconds} s"
            out.extend([reason] * (len(variables) - i))
            return out, True
        try:
            signal.setitimer(signal.ITIMER_REAL, min(budget.message_seconds, left))
            try:
                msg = _renderer.render(template, values)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Timeout:
            reason = f"template exceeded the render time budget of {budget.message_seconds} s"
            out.extend([reason] * (len(variables) - i))
            return out, True
        except RenderError as exc:
            out.append(str(exc))
            continue
        out.append((msg.subject, msg.html, msg.text))
    return out, False


def _warm() -> bool:
    return _renderer is not None


class RenderPool:
    """Renders batches in ``workers`` processes within ``budget``; see the module docstring."""

    def __init__(self, workers: int = 2, budget: RenderBudget | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._workers = workers
        self._budget = budget or RenderBudget()
        self._poisoned: OrderedDict[bytes, str] = OrderedDict()
        self._pool = self._new_pool()

    @property
    def budget(self) -> RenderBudget:
        """The budgets every render runs under."""
        return self._budget

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self._workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self._budget,),
        )

    async def start(self) -> None:
        """Starts every worker now, so the first batch does not pay for process start-up."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._pool, _warm) for _ in range(self._workers))
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
    ) -> tuple[list[_Wire], bool]:
        pool = self._pool
        future = pool.submit(_render_in_worker, template, variables, self._budget)
        # Grace beyond the batch budget covers queueing behind other batches and a loaded box,
        # and stays under the router's default SendBatch timeout (10 s).
        limit = self._budget.batch_seconds + 2.0
        try:
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
        _kill(broken)

    def _poison(self, key: bytes, reason: str) -> None:
        self._poisoned[key] = reason
        while len(self._poisoned) > _POISON_CACHE:
            self._poisoned.popitem(last=False)

    async def aclose(self) -> None:
        """Stops the workers without waiting for renders in flight."""
        _kill(self._pool)


def _kill(pool: ProcessPoolExecutor) -> None:
    # The executor has no public way to kill its workers; terminate them before shutdown so a
    # stuck render cannot hold shutdown (or the pool restart) hostage.
    processes = list(getattr(pool, "_processes", {}).values())
    for process in processes:
        with contextlib.suppress(Exception):
            process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _content_key(template: Template) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for part in (template.subject, template.html_body, template.text_body):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.digest()
