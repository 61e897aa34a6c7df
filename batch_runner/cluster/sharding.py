"""Which process makes which row.

Two ways, both deciding over the same ordered list of pending rows, which the main process
computes and sends to all:

* static: a fixed contiguous split by global rank (accelerate's split, balanced within one row);
* dynamic (default): processes claim chunks from a shared counter as they go, so a process that
  drew cheap rows never idles while another has a backlog. The counter lives in the TCPStore of
  the process group that accelerate starts (multi-node included), or in memory for one process.

Chunks shrink as the queue empties (guided self-scheduling): big enough early to encode many
prompts at once, single rows at the end so that all processes finish together.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Protocol


def static_shard(num_items: int, rank: int, world_size: int) -> range:
    """Contiguous share of `rank`: sizes differ by at most one, every item in exactly one share.

    The same arithmetic as accelerate's PartialState.split_between_processes, on indices.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class Counter(Protocol):
    """The one primitive claims need: an atomic fetch-and-add (c10d Store.add has this shape)."""

    def add(self, key: str, amount: int) -> int: ...


class LocalCounter:
    """In-process stand-in for the TCPStore when there is a single process."""

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, key: str, amount: int) -> int:
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount
            return self._values[key]


def chunk_size(remaining: int, world_size: int, max_chunk: int) -> int:
    """Guided self-scheduling: a share of what is left, never more than max_chunk, never 0."""
    return max(1, min(max_chunk, math.ceil(remaining / (2 * world_size))))


class WorkQueue:
    """Dynamic claims over `num_items` positions shared by `world_size` processes."""

    def __init__(self, counter: Counter, num_items: int, world_size: int, max_chunk: int, key: str) -> None:
        self.counter = counter
        self.num_items = num_items
        self.world_size = world_size
        self.max_chunk = max(1, max_chunk)
        self.key = key

    def claim(self) -> range:
        """The next chunk of positions for the caller; empty once all are claimed."""
        seen = self.counter.add(self.key, 0)
        size = chunk_size(self.num_items - seen, self.world_size, self.max_chunk)
        end = self.counter.add(self.key, size)
        start = end - size
        return range(min(start, self.num_items), min(end, self.num_items))

    def __iter__(self) -> Iterator[range]:
        while chunk := self.claim():
            yield chunk


class StaticQueue:
    """The static split, offered in chunks so the generation loop is the same for both."""

    def __init__(self, num_items: int, rank: int, world_size: int, max_chunk: int) -> None:
        self.share = static_shard(num_items, rank, world_size)
        self.max_chunk = max(1, max_chunk)

    def __iter__(self) -> Iterator[range]:
        for start in range(self.share.start, self.share.stop, self.max_chunk):
            yield range(start, min(start + self.max_chunk, self.share.stop))
