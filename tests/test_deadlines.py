"""deadlines.py: one timer for a deadline that moves often and expires rarely."""

from __future__ import annotations

import asyncio

from gateway.edge.deadlines import Deadline


def expiries(script: object) -> list[float]:
    """Run `script(deadline)` on a fresh loop; the loop times (from the start) at which it expired."""

    async def body() -> list[float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        fired: list[float] = []
        deadline = Deadline(loop, lambda: fired.append(loop.time() - start))
        await script(deadline)  # type: ignore[operator]
        return fired

    return asyncio.run(body())


def test_a_wait_past_its_deadline_expires_once() -> None:
    async def script(d: Deadline) -> None:
        d.set(0.05)
        await asyncio.sleep(0.2)

    (at,) = expiries(script)
    assert 0.05 <= at < 0.2


def test_a_deadline_cleared_in_time_never_expires() -> None:
    async def script(d: Deadline) -> None:
        d.set(0.05)
        d.clear()
        await asyncio.sleep(0.15)

    assert expiries(script) == []


def test_moving_the_deadline_later_keeps_it_from_expiring_at_the_old_one() -> None:
    async def script(d: Deadline) -> None:
        for _ in range(6):  # 0.3 s in all, past the first deadline; each wait well inside its 0.2 s
            d.set(0.2)
            await asyncio.sleep(0.05)
        d.clear()
        await asyncio.sleep(0.3)

    assert expiries(script) == []


def test_an_earlier_deadline_brings_the_timer_forward() -> None:
    async def script(d: Deadline) -> None:
        d.clear()
        d.set(30)  # the timer is now set for 30 s from here
        d.set(0.05)
        await asyncio.sleep(0.2)

    (at,) = expiries(script)
    assert at < 0.2


def test_cancel_leaves_no_timer_and_no_expiry() -> None:
    async def script(d: Deadline) -> None:
        d.set(0.05)
        d.cancel()
        assert not [h for h in asyncio.get_running_loop()._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)

    assert expiries(script) == []
