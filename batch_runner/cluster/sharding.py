"""Which process makes which row.

Two ways, both deciding over the same ordered list of pending rows, which the main process
computes and sends to all:

* static: a fixed contiguous split by global rank (accelerate's split, balanced within one row);
* dynamic (default): processes claim chunks from a shared counter as they go, so a process that
  drew cheap rows never idles while another has a backlog. The counter lives in the TCPStore of
  the process group that accelerate starts (multi-node included), or in memory for one process.

Chunks shrink as the queue empties (guided self-scheduling): big enough early to encode many
prompts at once, single rows at the end so that all processes finish together.

Stragglers (dynamic only): a process that stops making progress (a hung GPU, a stopped process)
would hold the rows it claimed until someone kills it. Claims keeps, in the same store, each
process's chunks, a progress count it bumps at every row and denoising step, and one token per
row for starting it and one for publishing it. A process whose own claims are exhausted watches
the others; one whose progress count has not moved for `claim_timeout` seconds (on the watcher's
own clock, so hosts' clocks need not agree) loses its unstarted rows to the watcher, which takes
their start tokens (the straggler, when it wakes, finds them taken and skips them), and its started
but unpublished rows are made again by one watcher. Exactly once holds through the publish token:
the first finished copy of a row is published, recorded and counted; a later copy is discarded.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

# The first wait between two questions to the store of a polling loop; each later one doubles.
FIRST_POLL_SECONDS = 0.05


def poll_delays(most: float) -> Iterator[float]:
    """The waits of a loop that polls the store: FIRST_POLL_SECONDS, then twice as long each time up
    to `most`. Processes of a launch usually finish within moments of each other: a fixed `most`
    between polls would cost every run up to that much at its end."""
    delay = min(FIRST_POLL_SECONDS, most)
    while True:
        yield delay
        delay = min(2 * delay, most)


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


# A stalled process's unpublished rows lie in its last few chunks: the one it was making and those
# whose videos may still wait in its writer's queue (the runner keeps at most two writes pending).
RECENT_CHUNKS = 4


class Claims(WorkQueue):
    """Dynamic claims that a process which makes no progress for `timeout` seconds loses (module docstring).

    Iterating yields this process's claimed chunks, then, once none are left to claim, rows taken
    over from stragglers (one at a time) until every row is published. `start(position)` before a
    row is made, `publish(position)` before its result is written, `beat()` at each step of progress.
    """

    def __init__(
        self,
        counter: Counter,
        num_items: int,
        world_size: int,
        max_chunk: int,
        key: str,
        rank: int,
        timeout: float,
        poll_seconds: float = 1.0,
        on_idle: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(counter, num_items, world_size, max_chunk, key)
        self.rank = rank
        self.timeout = timeout
        self.poll_seconds = min(poll_seconds, timeout / 4)
        self.on_idle = on_idle
        self.clock = clock
        self.sleep = sleep
        self._taken: set[int] = set()  # rows this process took over: their start is already its own

    def _key(self, *parts: object) -> str:
        return "/".join([self.key, *map(str, parts)])

    def __iter__(self) -> Iterator[range]:
        while chunk := self.claim():
            self._record(chunk)
            yield chunk
        if self.world_size > 1:
            yield from self._take_over()

    def beat(self) -> None:
        """This process made progress (a row started or finished, a denoising step)."""
        self.counter.add(self._key("beat", self.rank), 1)

    def start(self, position: int) -> bool:
        """Whether this process makes row `position` now: False when another took it over meanwhile."""
        self.beat()
        if position in self._taken:
            return True
        return self._start_token(position)

    def _start_token(self, position: int) -> bool:
        if self.counter.add(self._key("start", position), 1) != 1:
            return False
        self.counter.add(self._key("owner", position), self.rank + 1)  # who makes it, for the watchers
        return True

    def publish(self, position: int) -> bool:
        """Whether this copy of row `position` is the first finished one, to be written and recorded."""
        self.beat()
        if self.counter.add(self._key("published", position), 1) != 1:
            return False
        self.counter.add(self._key("published"), 1)
        return True

    def _record(self, chunk: range) -> None:
        """Say in the store which rows this process holds, for the others to take over if it stalls."""
        k = self.counter.add(self._key("chunks", self.rank), 1)
        self.counter.add(self._key("chunk", self.rank, k, "start"), chunk.start + 1)
        self.counter.add(self._key("chunk", self.rank, k, "stop"), chunk.stop + 1)

    def _chunks_of(self, rank: int) -> Iterator[range]:
        last = self.counter.add(self._key("chunks", rank), 0)
        for k in range(max(1, last - RECENT_CHUNKS + 1), last + 1):
            start = self.counter.add(self._key("chunk", rank, k, "start"), 0) - 1
            stop = self.counter.add(self._key("chunk", rank, k, "stop"), 0) - 1
            yield range(max(start, 0), max(stop, 0))

    def _take_over(self) -> Iterator[range]:
        """Until every row is published: watch the others' progress and take a straggler's rows."""
        seen: dict[int, tuple[int, float]] = {}  # rank -> (its progress count, when it last moved)
        delays = poll_delays(self.poll_seconds)
        while self.counter.add(self._key("published"), 0) < self.num_items:
            if self.on_idle is not None:
                self.on_idle()
            taken = [p for rank in self._stalled(seen) for p in self._take_from(rank)]
            if not taken:
                self.sleep(next(delays))
                continue
            for position in taken:
                self._taken.add(position)
                self._record(range(position, position + 1))
                yield range(position, position + 1)

    def _stalled(self, seen: dict[int, tuple[int, float]]) -> list[int]:
        now = self.clock()
        stalled = []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            count = self.counter.add(self._key("beat", rank), 0)
            if rank not in seen or seen[rank][0] != count:
                seen[rank] = (count, now)
            elif now - seen[rank][1] >= self.timeout:
                stalled.append(rank)
        return stalled

    def _take_from(self, rank: int) -> list[int]:
        """The stalled process's unpublished rows this process wins: unstarted ones by their start
        token, started ones by a redo token (one watcher makes them again; publishing decides)."""
        won = []
        for chunk in self._chunks_of(rank):
            for position in chunk:
                if self.counter.add(self._key("published", position), 0):
                    continue
                if self._start_token(position):
                    won.append(position)
                    continue
                # Started: made again only if the stalled process itself makes it (not one that took it over).
                stalled_owns = self.counter.add(self._key("owner", position), 0) == rank + 1
                if stalled_owns and self.counter.add(self._key("redo", position), 1) == 1:
                    won.append(position)
        return won
