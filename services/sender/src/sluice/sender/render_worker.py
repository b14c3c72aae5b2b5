"""The worker side of ``render_pool``: what runs inside a render process.

Kept apart, and importing nothing but the renderer and the standard library, so a worker
process starts fast (no gRPC, no settings) and holds nothing it does not need.
"""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from sluice.sender.render import Renderer, RenderError, Template

# (subject, html, text) on success, the reason on failure: plain tuples pickle fastest.
Wire = tuple[str, str, str] | str


@dataclass(frozen=True, slots=True)
class RenderBudget:
    """What one render may cost. ``message_seconds`` per message, ``batch_seconds`` for a
    whole batch, ``max_output_chars`` per message, ``memory_bytes`` of address space a
    worker may grow by beyond its size at start."""

    message_seconds: float = 0.5
    batch_seconds: float = 5.0
    max_output_chars: int = 1_000_000
    memory_bytes: int = 512 * 1024 * 1024


class _Timeout(BaseException):
    """Raised in the worker by the timer; a BaseException so ``except Exception`` in a
    filter or in Jinja's runtime does not swallow it."""


_renderer: Renderer | None = None


def _on_timer(signum: int, frame: FrameType | None) -> None:
    raise _Timeout


def init_worker(budget: RenderBudget, parent: int) -> None:
    """Sets a worker up; ``parent`` is the sender's pid (the worker may start after the
    sender died, so it cannot take its parent from ``getppid``)."""
    global _renderer
    _renderer = Renderer(max_output_chars=budget.max_output_chars)
    signal.signal(signal.SIGALRM, _on_timer)
    # The parent handles SIGINT/SIGTERM and shuts the pool down; a worker must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _watch_parent(parent)
    with open("/proc/self/statm", encoding="ascii") as statm:  # noqa: PTH123 (a proc file)
        current = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = current + budget.memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


#: How often a worker checks that the sender that started it is still alive.
PARENT_CHECK_SECONDS = 1.0


def _watch_parent(parent: int) -> None:
    """Exits the worker once its sender is gone.

    A sender killed outright (SIGKILL, the OOM killer) cannot shut its pool down, and an idle
    worker would wait on the call queue forever: the queue's pipe stays open because every
    worker holds both of its ends. The worker is then re-parented, which this notices."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def render_batch(
    template: Template, variables: Sequence[Mapping[str, str]], budget: RenderBudget
) -> tuple[list[Wire], bool]:
    """Renders every message; returns the results and whether the time budget ran out.

    Once one message exceeds its budget, or the batch exceeds its own, the rest fail with
    the same reason: the template is at fault, and each would cost another budget."""
    assert _renderer is not None, "worker not initialised"
    out: list[Wire] = []
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


def warm() -> bool:
    return _renderer is not None
