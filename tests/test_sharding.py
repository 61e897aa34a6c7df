"""Who makes which row: static shards and dynamic claims, over many (rows, world size) pairs."""

from __future__ import annotations

import threading
from collections import Counter as Tally

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch_runner.cluster.sharding import Claims, LocalCounter, StaticQueue, WorkQueue, chunk_size, static_shard
from batch_runner.inputs.ids import derive_seed
from batch_runner.inputs.manifest import load_manifest

from .conftest import photo, run_config, write_manifest

rows_and_world = st.integers(1, 64).flatmap(lambda world: st.tuples(st.integers(0, 2000), st.just(world)))


# --- static ---------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(rows_and_world)
def test_static_shards_are_disjoint_complete_balanced_and_contiguous(pair):
    num_items, world = pair
    shards = [static_shard(num_items, rank, world) for rank in range(world)]

    flat = [i for shard in shards for i in shard]
    assert flat == list(range(num_items))  # complete, disjoint, in rank order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the extra rows go to the first ranks
    assert all(s.step == 1 for s in shards)
    # Deterministic: every process computes the same split on its own.
    assert shards == [static_shard(num_items, rank, world) for rank in range(world)]


@settings(max_examples=200, deadline=None)
@given(rows_and_world, st.integers(1, 40))
def test_static_queue_offers_exactly_its_share_in_chunks(pair, max_chunk):
    num_items, world = pair
    seen: list[int] = []
    for rank in range(world):
        share = static_shard(num_items, rank, world)
        chunks = list(StaticQueue(num_items, rank, world, max_chunk))
        assert all(0 < len(c) <= max_chunk for c in chunks)
        assert [i for c in chunks for i in c] == list(share)
        seen += [i for c in chunks for i in c]
    assert sorted(seen) == list(range(num_items))


def test_static_shard_known_split():
    # 10 rows over 4 processes: 3, 3, 2, 2, as accelerate splits them.
    assert [list(static_shard(10, r, 4)) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [len(static_shard(2, r, 5)) for r in range(5)] == [1, 1, 0, 0, 0]


@pytest.mark.parametrize(("rank", "world"), [(-1, 4), (4, 4), (0, 0)])
def test_static_shard_rejects_rank_outside_world(rank, world):
    with pytest.raises(ValueError, match="outside world"):
        static_shard(10, rank, world)


# --- dynamic: claims drawn in random orders -------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 400), st.integers(1, 32), st.integers(1, 16), st.data())
def test_dynamic_claims_in_any_order_cover_every_row_once(num_items, world, max_chunk, data):
    """Whole claims by simulated ranks, the order of claims drawn by hypothesis."""
    counter = LocalCounter()
    queues = [WorkQueue(counter, num_items, world, max_chunk, key="claimed") for _ in range(world)]
    owner: dict[int, int] = {}
    finished: set[int] = set()
    claims = 0
    while len(finished) < world:
        rank = data.draw(st.sampled_from(sorted(set(range(world)) - finished)), label="rank")
        chunk = queues[rank].claim()
        claims += 1
        assert claims <= num_items + world  # every non-empty claim takes at least one row
        if not chunk:
            finished.add(rank)
            continue
        assert chunk.step == 1 and 0 < len(chunk) <= max_chunk
        for i in chunk:
            assert i not in owner, f"row {i} claimed by rank {owner[i]} and rank {rank}"
            owner[i] = rank
    assert sorted(owner) == list(range(num_items))
    # Once empty, the queue stays empty for everyone.
    assert all(not q.claim() for q in queues)


class SteppedCounter:
    """A shared counter whose every `add` waits for the scheduler's go-ahead.

    Each simulated rank runs in its own thread; the test decides which waiting rank's next counter
    operation happens next, so the read and the add inside one claim can be split by other ranks'
    operations, as they can be over a TCPStore.
    """

    def __init__(self, ranks: int) -> None:
        self.inner = LocalCounter()
        self.cond = threading.Condition()
        self.state = dict.fromkeys(range(ranks), "running")
        self.granted: int | None = None
        self.local = threading.local()
        self.operations = 0

    def add(self, key: str, amount: int) -> int:
        rank = self.local.rank
        with self.cond:
            self.state[rank] = "waiting"
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: self.granted == rank, timeout=10):
                raise TimeoutError(f"rank {rank} never got its turn")
            self.granted = None
            self.operations += 1
            return self.inner.add(key, amount)

    def finish(self, rank: int) -> None:
        with self.cond:
            self.state[rank] = "finished"
            self.cond.notify_all()

    def next_turn(self, choose) -> bool:
        """Let one waiting rank do its next operation; False once every rank has finished."""
        with self.cond:
            settled = self.cond.wait_for(lambda: "running" not in self.state.values(), timeout=10)
            assert settled, f"ranks did not reach the counter: {self.state}"
            waiting = [r for r, s in self.state.items() if s == "waiting"]
            if not waiting:
                return False
            rank = choose(waiting)
            self.state[rank] = "running"
            self.granted = rank
            self.cond.notify_all()
            return True


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 300), st.integers(1, 8), st.integers(1, 12), st.data())
def test_dynamic_claims_under_interleaved_counter_operations(num_items, world, max_chunk, data):
    """Ranks race: any interleaving of their counter operations loses and doubles no row."""
    counter = SteppedCounter(world)
    claimed: dict[int, list[range]] = {rank: [] for rank in range(world)}
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        counter.local.rank = rank
        try:
            for chunk in WorkQueue(counter, num_items, world, max_chunk, key="claimed"):
                claimed[rank].append(chunk)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            counter.finish(rank)

    threads = [threading.Thread(target=worker, args=(rank,), daemon=True) for rank in range(world)]
    for t in threads:
        t.start()
    steps = 0
    while counter.next_turn(lambda waiting: data.draw(st.sampled_from(waiting), label="next op")):
        steps += 1
        assert steps <= 4 * (num_items + world) + 10
    for t in threads:
        t.join(timeout=10)
    assert not errors, errors

    tally = Tally(i for chunks in claimed.values() for chunk in chunks for i in chunk)
    assert sorted(tally) == list(range(num_items)), "a row was lost"
    assert all(n == 1 for n in tally.values()), f"rows claimed twice: {[i for i, n in tally.items() if n > 1]}"
    assert all(0 < len(c) <= max_chunk for chunks in claimed.values() for c in chunks)
    assert counter.inner.add("claimed", 0) >= num_items


def test_local_counter_is_atomic_under_threads():
    counter = LocalCounter()
    barrier = threading.Barrier(8)

    def hammer() -> None:
        barrier.wait()
        for _ in range(2000):
            counter.add("k", 1)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.add("k", 0) == 16000
    assert counter.add("other", 5) == 5  # keys are independent


def test_threads_sharing_a_real_work_queue_claim_every_row_once():
    counter = LocalCounter()
    num_items, world = 5000, 6
    got: list[list[int]] = [[] for _ in range(world)]

    def worker(rank: int) -> None:
        for chunk in WorkQueue(counter, num_items, world, 8, key="claimed"):
            got[rank].extend(chunk)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(i for g in got for i in g) == list(range(num_items))


@settings(max_examples=300, deadline=None)
@given(st.integers(-50, 100_000), st.integers(1, 64), st.integers(1, 64))
def test_chunk_size_is_a_bounded_share_of_what_is_left(remaining, world, max_chunk):
    size = chunk_size(remaining, world, max_chunk)
    assert 1 <= size <= max_chunk
    if remaining > 0:
        assert size <= max(1, -(-remaining // (2 * world)))


def test_chunks_shrink_to_single_rows_at_the_end():
    counter = LocalCounter()
    queue = WorkQueue(counter, 200, 2, 16, key="claimed")
    sizes = [len(chunk) for chunk in queue]
    assert sum(sizes) == 200
    assert sizes[0] == 16
    assert sizes[-3:] == [1, 1, 1]
    assert sizes == sorted(sizes, reverse=True)


def test_zero_max_chunk_still_makes_progress():
    queue = WorkQueue(LocalCounter(), 5, 1, 0, key="claimed")
    assert [list(c) for c in queue] == [[0], [1], [2], [3], [4]]
    assert [list(c) for c in StaticQueue(3, 0, 1, 0)] == [[0], [1], [2]]


# --- seeds do not depend on who makes the row ---------------------------------------------------


def test_row_seed_does_not_depend_on_world_size_or_rank(tmp_path):
    photo(tmp_path / "cat.png", (40, 30))
    rows = [{"id": f"clip-{i}", "image": "cat.png", "prompt": f"p{i}"} for i in range(23)]
    rows[5]["seed"] = 99
    write_manifest(tmp_path / "m.csv", rows)
    cfg = run_config("manifest=unused.csv", "model=tiny", "seed=7")
    jobs = load_manifest(tmp_path / "m.csv", cfg.model, cfg.seed).jobs
    single = {job.id: job.seed for job in jobs}
    assert single["clip-5"] == 99
    assert single["clip-0"] == derive_seed(7, "clip-0")

    for world in (1, 2, 3, 8, 40):
        # Every process loads the manifest itself; rows are only positions into the same job list.
        for rank in range(world):
            local_jobs = load_manifest(tmp_path / "m.csv", cfg.model, cfg.seed).jobs
            for i in static_shard(len(local_jobs), rank, world):
                assert local_jobs[i].seed == single[local_jobs[i].id]
        counter = LocalCounter()
        queues = [WorkQueue(counter, len(jobs), world, 4, key="claimed") for _ in range(world)]
        made: dict[str, int] = {}
        for turn in range(10 * len(jobs)):
            rank = (turn * 7 + world) % world
            for i in queues[rank].claim():
                made[jobs[i].id] = jobs[i].seed
        assert made == single


# --- stragglers -----------------------------------------------------------------------------------


class Clock:
    """A clock that moves only when a process sleeps: timeouts without waiting them out."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def claims_of(counter, rank: int, clock: Clock, num_items: int = 12, max_chunk: int = 3) -> Claims:
    return Claims(counter, num_items, 2, max_chunk, "claimed", rank, timeout=10.0, clock=clock, sleep=clock.sleep)


def make(claims: Claims, chunks, published: list[tuple[int, int]]) -> None:
    """A process that makes every row it may start and publishes each one it finishes first."""
    for chunk in chunks:
        for position in chunk:
            if claims.start(position) and claims.publish(position):
                published.append((claims.rank, position))


def test_a_stalled_process_loses_its_claimed_rows_and_its_late_copy_is_discarded():
    counter, clock, published = LocalCounter(), Clock(), []
    stalled, other = claims_of(counter, 0, clock), claims_of(counter, 1, clock)
    held = iter(stalled)
    chunk = next(held)  # rows 0..2 claimed
    assert list(chunk) == [0, 1, 2]
    assert stalled.start(0)  # row 0 started, then the process stops (SIGSTOP, a hung GPU)

    make(other, other, published)  # its own rows, then, after the timeout, the stalled one's

    assert sorted(p for _, p in published) == list(range(12)), "the other process finished every row"
    assert clock.now >= 10.0, "only after claim_timeout without progress"
    # The stalled process wakes: the rows it had not started are gone, its copy of row 0 comes second.
    assert not stalled.start(1) and not stalled.start(2)
    assert not stalled.publish(0)
    assert list(held) == [], "nothing left for it to claim or take over"
    assert sorted(p for _, p in published) == list(range(12)), "each row published once"


def test_a_process_that_makes_progress_keeps_its_rows():
    counter, clock, published = LocalCounter(), Clock(), []
    slow, other = claims_of(counter, 0, clock, max_chunk=2), claims_of(counter, 1, clock, max_chunk=2)
    chunk = next(iter(slow))
    assert slow.start(chunk[0])

    def slow_but_alive(seconds: float) -> None:  # each poll of the other process sees one more step
        clock.sleep(seconds)
        slow.beat()
        if clock.now > 100:  # then it finishes its rows
            for position in chunk:
                if position == chunk[0] or slow.start(position):
                    slow.publish(position)

    other.sleep = slow_but_alive
    make(other, other, published)
    assert not {p for _, p in published} & set(chunk), "none of the live process's rows was taken or remade"
    assert sorted(p for _, p in published) == sorted(set(range(12)) - set(chunk))


def test_a_single_process_never_waits_for_others():
    counter, clock, published = LocalCounter(), Clock(), []
    alone = Claims(counter, 5, 1, 2, "claimed", 0, timeout=10.0, clock=clock, sleep=clock.sleep)
    make(alone, alone, published)
    assert sorted(p for _, p in published) == list(range(5)) and clock.now == 0.0
