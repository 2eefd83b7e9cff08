"""OrderedAcks: tokens are released strictly in offset order per partition."""

from __future__ import annotations

import random

import pytest

from fileserver.acks import OrderedAcks


def filled(partition: str, offsets: list[int]) -> OrderedAcks[str]:
    acks: OrderedAcks[str] = OrderedAcks()
    for offset in offsets:
        acks.add(partition, offset, f"{partition}@{offset}")
    return acks


@pytest.mark.parametrize(
    ("offsets", "done_order", "released"),
    [
        # in order: each done releases itself
        ([0, 1, 2], [0, 1, 2], [["p@0"], ["p@1"], ["p@2"]]),
        # reversed: nothing until the head, then everything
        ([0, 1, 2], [2, 1, 0], [[], [], ["p@0", "p@1", "p@2"]]),
        # a gap in the middle holds back the tail only
        ([0, 1, 2, 3], [0, 2, 3, 1], [["p@0"], [], [], ["p@1", "p@2", "p@3"]]),
        ([0, 1, 2, 3], [1, 0, 3, 2], [[], ["p@0", "p@1"], [], ["p@2", "p@3"]]),
        # offsets need not be contiguous (compacted topics, transaction markers)
        ([5, 9, 10, 42], [42, 9, 5, 10], [[], [], ["p@5", "p@9"], ["p@10", "p@42"]]),
    ],
)
def test_release_in_order(
    offsets: list[int], done_order: list[int], released: list[list[str]]
) -> None:
    acks = filled("p", offsets)
    assert len(acks) == len(offsets)
    got = [acks.done("p", offset) for offset in done_order]
    assert got == released
    assert len(acks) == 0
    assert acks.waiting("p") == 0


def test_len_and_waiting_count_unreleased() -> None:
    acks = filled("p", [0, 1, 2])
    acks.add("q", 7, "q@7")
    assert (len(acks), acks.waiting("p"), acks.waiting("q")) == (4, 3, 1)
    assert acks.done("p", 1) == []
    assert (len(acks), acks.waiting("p")) == (4, 3)  # finished but held back: still counted
    assert acks.done("p", 0) == ["p@0", "p@1"]
    assert (len(acks), acks.waiting("p"), acks.waiting("q")) == (2, 1, 1)
    assert acks.waiting("unknown") == 0


def test_partitions_are_independent() -> None:
    acks: OrderedAcks[str] = OrderedAcks()
    for offset in (0, 1):
        acks.add(("t", 0), offset, f"a{offset}")
        acks.add(("t", 1), offset, f"b{offset}")
    assert acks.done(("t", 0), 1) == []  # partition 0 is blocked on offset 0 ...
    assert acks.done(("t", 1), 0) == ["b0"]  # ... which does not block partition 1
    assert acks.done(("t", 1), 1) == ["b1"]
    assert acks.done(("t", 0), 0) == ["a0", "a1"]
    assert len(acks) == 0


def test_same_offset_in_two_partitions() -> None:
    acks: OrderedAcks[str] = OrderedAcks()
    acks.add(0, 10, "p0")
    acks.add(1, 10, "p1")
    assert acks.done(1, 10) == ["p1"]
    assert acks.waiting(0) == 1


@pytest.mark.parametrize(("first", "second"), [(5, 5), (5, 4), (5, 0)])
def test_add_out_of_order_raises(first: int, second: int) -> None:
    acks = filled("p", [first])
    with pytest.raises(ValueError, match="out of order"):
        acks.add("p", second, "late")
    assert len(acks) == 1
    assert acks.done("p", first) == [f"p@{first}"]


def test_add_after_release_still_requires_increasing_offsets() -> None:
    acks = filled("p", [0, 1])
    assert acks.done("p", 0) == ["p@0"]
    with pytest.raises(ValueError):
        acks.add("p", 1, "again")
    acks.add("p", 2, "p@2")
    assert acks.done("p", 1) == ["p@1"]
    assert acks.done("p", 2) == ["p@2"]


@pytest.mark.parametrize(
    ("partition", "offset"),
    [("p", 99), ("unknown", 0)],
)
def test_done_for_unknown_offset_releases_nothing(partition: str, offset: int) -> None:
    acks = filled("p", [0])
    assert acks.done(partition, offset) == []
    assert len(acks) == 1


def test_done_twice_releases_once() -> None:
    acks = filled("p", [0, 1])
    assert acks.done("p", 0) == ["p@0"]
    assert acks.done("p", 0) == []
    assert acks.done("p", 1) == ["p@1"]
    assert len(acks) == 0


def test_forget_drops_a_partition() -> None:
    acks = filled("p", [0, 1, 2])
    acks.add("q", 0, "q@0")
    assert acks.done("p", 2) == []
    assert acks.forget("p") == 3
    assert len(acks) == 1
    assert acks.waiting("p") == 0
    assert acks.done("p", 0) == []  # revoked: late completions are ignored
    assert acks.forget("p") == 0
    assert acks.forget("never") == 0
    assert acks.done("q", 0) == ["q@0"]
    # the partition may be re-assigned and start over from any offset
    acks.add("p", 1, "p@1-again")
    assert acks.done("p", 1) == ["p@1-again"]
    assert len(acks) == 0


@pytest.mark.parametrize("seed", range(40))
def test_random_completion_order_releases_each_partition_in_order(seed: int) -> None:
    rng = random.Random(seed)
    partitions = list(range(rng.randint(1, 6)))
    offsets: dict[int, list[int]] = {}
    acks: OrderedAcks[tuple[int, int]] = OrderedAcks()
    pending: list[tuple[int, int]] = []
    for partition in partitions:
        start = rng.randint(0, 1000)
        offs = sorted(rng.sample(range(start, start + 500), rng.randint(0, 120)))
        offsets[partition] = offs
        for offset in offs:
            acks.add(partition, offset, (partition, offset))
            pending.append((partition, offset))
    total = len(pending)
    assert len(acks) == total
    rng.shuffle(pending)

    released: dict[int, list[int]] = {p: [] for p in partitions}
    finished: set[tuple[int, int]] = set()
    for partition, offset in pending:
        finished.add((partition, offset))
        for token_partition, token_offset in acks.done(partition, offset):
            assert token_partition == partition
            # never released before it finished, nor before every earlier offset finished
            assert (token_partition, token_offset) in finished
            assert all((partition, o) in finished for o in offsets[partition] if o < token_offset)
            released[partition].append(token_offset)
        # and released as soon as possible: exactly the finished prefix of the partition
        prefix = []
        for o in offsets[partition]:
            if (partition, o) not in finished:
                break
            prefix.append(o)
        assert released[partition] == prefix
        assert len(acks) + sum(map(len, released.values())) == total
        assert acks.waiting(partition) == len(offsets[partition]) - len(prefix)

    for partition in partitions:
        assert released[partition] == offsets[partition]  # strictly increasing and complete
    assert len(acks) == 0
