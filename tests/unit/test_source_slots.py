"""SourceSlots: at most N downloads at a time per source (fileserver.fetch)."""

from __future__ import annotations

import asyncio

import pytest

from fileserver.fetch import SourceSlots

A, B = ("gw1.example", 8088), ("gw2.example", 8088)


async def test_a_source_past_its_limit_waits_and_others_do_not() -> None:
    slots = SourceSlots(2)
    entered: list[str] = []
    release = {name: asyncio.Event() for name in ("a1", "a2", "a3", "b1")}

    async def download(name: str, key: tuple[str, int]) -> None:
        async with slots.hold(key):
            entered.append(name)
            await release[name].wait()

    tasks = [
        asyncio.create_task(download(n, k)) for n, k in (("a1", A), ("a2", A), ("a3", A), ("b1", B))
    ]
    for _ in range(5):
        await asyncio.sleep(0)
    assert sorted(entered) == ["a1", "a2", "b1"]  # a3 waits for a slot of A only
    assert (slots.in_use(A), slots.in_use(B), len(slots)) == (2, 1, 2)
    release["a1"].set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert "a3" in entered and slots.in_use(A) == 2
    for event in release.values():
        event.set()
    await asyncio.gather(*tasks)
    assert len(slots) == 0 and slots.in_use(A) == 0  # no entry left behind


async def test_cancelled_while_waiting_gives_its_place_back() -> None:
    slots = SourceSlots(1)
    holding = asyncio.Event()
    done = asyncio.Event()

    async def holder() -> None:
        async with slots.hold(A):
            holding.set()
            await done.wait()

    first = asyncio.create_task(holder())
    await holding.wait()
    waiter = asyncio.create_task(slots.hold(A).__aenter__())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.in_use(A) == 1
    done.set()
    await first
    assert len(slots) == 0
    async with slots.hold(A):  # the slot is free again
        assert slots.in_use(A) == 1


async def test_an_error_in_the_block_releases_the_slot() -> None:
    slots = SourceSlots(1)
    with pytest.raises(RuntimeError):
        async with slots.hold(A):
            raise RuntimeError("download failed")
    assert len(slots) == 0
    async with slots.hold(A):
        assert slots.in_use(A) == 1


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SourceSlots(0)
