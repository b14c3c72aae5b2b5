"""Admission: bounded calls and intents, no waiting, and shedding while the loop lags."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from sluice.common.errors import ResourceExhausted
from sluice.ingest.admission import OVERLOADED, Admission, IdleMeter


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


async def _spin(seconds: float) -> None:
    """Keeps the loop busy without blocking it: always something ready to run."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # noqa: ASYNC110  (spins on purpose)
        await asyncio.sleep(0)


async def test_the_idle_meter_sees_a_waiting_loop_and_a_busy_one() -> None:
    meter = IdleMeter.of(asyncio.get_running_loop())
    assert meter is not None
    assert IdleMeter.of(asyncio.get_running_loop()) is meter  # installed once per loop
    before = meter.idle
    await asyncio.sleep(0.3)
    waited = meter.idle - before
    before = meter.idle
    await _spin(0.3)
    spun = meter.idle - before
    assert waited > 0.2
    assert spun < waited / 3


async def test_a_busy_loop_admits_a_shrinking_share_of_new_calls_until_it_idles() -> None:
    gate = Admission(max_calls=1000, max_items=1000, retry_after=0.1, max_busy=0.5)
    watch = asyncio.create_task(gate.watch(interval=0.01))
    try:
        await asyncio.sleep(0.1)
        assert gate.admitting == 1.0
        with gate.admit():
            pass
        await _spin(1.0)
        assert gate.busy is not None
        assert gate.busy > 0.5
        assert gate.admitting < 0.2
        refused: list[ResourceExhausted] = []
        for _ in range(200):
            try:
                with gate.admit():
                    pass
            except ResourceExhausted as exc:
                refused.append(exc)
        assert len(refused) > 100
        assert all(e.reason == OVERLOADED and "busy" in e.message for e in refused)
        deadline = time.monotonic() + 10
        while gate.admitting < 1.0 and time.monotonic() < deadline:  # noqa: ASYNC110  (polls a measurement)
            await asyncio.sleep(0.02)
        assert gate.admitting == 1.0
        with gate.admit():
            pass
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
