"""Admission: bounded calls and intents, no waiting, and shedding while the loop lags."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from sluice.common.errors import ResourceExhausted
from sluice.ingest.admission import OVERLOADED, Admission


def test_calls_and_intents_are_bounded_and_released() -> None:
    gate = Admission(max_calls=2, max_items=10, retry_after=0.2)
    with gate.admit(4), gate.admit(4):
        with pytest.raises(ResourceExhausted) as info, gate.admit(1):
            pass
        assert info.value.reason == OVERLOADED
        assert 0.2 <= info.value.retry_after <= 0.3
    with gate.admit(8), pytest.raises(ResourceExhausted), gate.admit(3):
        pass
    assert (gate.calls, gate.items) == (0, 0)
    with gate.admit(50):  # alone, a request over the item bound still gets in
        pass
    assert gate.shed == 2


async def test_a_lagging_loop_sheds_new_calls_until_it_recovers() -> None:
    gate = Admission(max_calls=100, max_items=100, retry_after=0.1, max_lag=0.05)
    watch = asyncio.create_task(gate.watch(interval=0.01))
    try:
        await asyncio.sleep(0.05)
        with gate.admit():
            pass
        for _ in range(3):
            time.sleep(0.3)  # noqa: ASYNC251  (blocks the loop on purpose, as CPU overload does)
            await asyncio.sleep(0.02)
        with pytest.raises(ResourceExhausted, match="behind"), gate.admit():
            pass
        deadline = time.monotonic() + 10
        while gate.lag > gate.max_lag and time.monotonic() < deadline:  # noqa: ASYNC110  (polls)  # noqa: ASYNC110  (polls a measurement)
            await asyncio.sleep(0.02)
        with gate.admit():
            pass
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


async def test_calls_waiting_in_grpc_core_shed_new_calls_until_they_are_taken_up() -> None:
    waiting = [0]
    gate = Admission(
        max_calls=100, max_items=100, retry_after=0.1, max_waiting=50, waiting=lambda: waiting[0]
    )
    watch = asyncio.create_task(gate.watch(interval=0.01))
    try:
        await asyncio.sleep(0.05)
        with gate.admit():
            pass
        waiting[0] = 400
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="400 calls waiting") as info, gate.admit():
            pass
        assert info.value.reason == OVERLOADED
        waiting[0] = 50  # at the bound is still fine
        await asyncio.sleep(0.05)
        with gate.admit():
            pass
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
