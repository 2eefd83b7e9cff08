"""In-order acknowledgement per partition. No I/O.

faust-streaming 0.15.3 can commit past an event that is still being processed when
acks arrive out of order (faust-streaming issue #606). :class:`OrderedAcks` makes acks
arrive in order: an event is released for acking only when it and every earlier event
of its partition have finished, so the acked offsets faust sees are always a
contiguous prefix and no commit can pass an event whose outcome is not durable.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class OrderedAcks(Generic[T]):
    """Tracks in-flight events per partition and releases them strictly in offset order."""

    def __init__(self) -> None:
        self._partitions: dict[Hashable, OrderedDict[int, list[object]]] = {}
        self._count = 0

    def __len__(self) -> int:
        """Events added and not yet released (in flight or waiting for an earlier one)."""
        return self._count

    def add(self, partition: Hashable, offset: int, token: T) -> None:
        """Register an event; offsets of one partition must be added in increasing order."""
        queue = self._partitions.setdefault(partition, OrderedDict())
        if queue and offset <= next(reversed(queue)):
            raise ValueError(f"offset {offset} of {partition!r} added out of order")
        queue[offset] = [token, False]
        self._count += 1

    def done(self, partition: Hashable, offset: int) -> list[T]:
        """Mark an event finished; return the tokens now safe to ack, oldest first."""
        queue = self._partitions.get(partition)
        if queue is None or offset not in queue:
            return []
        queue[offset][1] = True
        released: list[T] = []
        while queue:
            first = next(iter(queue))
            token, finished = queue[first]
            if not finished:
                break
            del queue[first]
            released.append(token)  # type: ignore[arg-type]
        self._count -= len(released)
        return released

    def forget(self, partition: Hashable) -> int:
        """Drop a partition (revoked); returns how many unreleased events it had."""
        queue = self._partitions.pop(partition, None)
        dropped = len(queue) if queue else 0
        self._count -= dropped
        return dropped

    def clear(self) -> list[T]:
        """Forget every partition; returns every unreleased token."""
        tokens = [entry[0] for queue in self._partitions.values() for entry in queue.values()]
        self._partitions.clear()
        self._count = 0
        return tokens  # type: ignore[return-value]

    def waiting(self, partition: Hashable) -> int:
        """Events of ``partition`` not yet released."""
        return len(self._partitions.get(partition, ()))
