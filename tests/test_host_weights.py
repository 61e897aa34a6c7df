"""One host copy of the weights, shared by the processes of a host (batch_runner.replica.host_weights).

Real processes with a real c10d TCPStore, as `accelerate launch` gives them: the check that a
process holds no private copy is that its parameters point into the loader's memfd.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from datetime import timedelta

import pytest
import torch
from torch.distributed import TCPStore

from batch_runner.cluster.cluster import HostPeers
from batch_runner.errors import UserError
from batch_runner.replica import host_weights

from .conftest import free_port

SHORT = timedelta(seconds=60)


class Tied(torch.nn.Module):
    """Tied weights, a buffer and a None parameter: what real components have."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, width)
        self.proj = torch.nn.Linear(width, 5, bias=False)
        self.proj.weight = self.embed.weight
        self.norm = torch.nn.LayerNorm(width, bias=False)
        self.register_buffer("scale", torch.full((width,), 0.5, dtype=torch.bfloat16))


def memfd_ranges() -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if f"memfd:{host_weights.MEMFD_PREFIX}" in line:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                ranges.append((start, end))
    return ranges


def in_shared_memory(tensor: torch.Tensor) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in memfd_ranges())


def worker(rank: int, cases: list[tuple[str, int, int]], results: mp.Queue) -> None:
    """This rank's part in each case (case, processes, port) it takes part in, one after the other, each
    case among the processes of its own store, as if they were that many new processes."""
    for case, size, port in cases:
        if rank >= size:
            continue
        store = TCPStore("127.0.0.1", port, size, rank == 0, timeout=SHORT)
        try:
            results.put((case, rank, *outcome(rank, size, store, case)))
        except Exception:
            results.put((case, rank, "crashed", traceback.format_exc()))
        # Keep the store (hosted by rank 0) alive until every process has reported and stopped asking.
        store.add("reported", 1)
        while store.add("reported", 0) < size:
            time.sleep(0.01)
        store.add("left", 1)
        while rank == 0 and store.add("left", 0) < size:
            time.sleep(0.01)


def outcome(rank: int, size: int, store: TCPStore, case: str) -> tuple[str, object]:
    peers = HostPeers(rank, size, store, "test-host")
    wanted = ["text_encoder"] if case != "one-wants" or rank == 0 else []
    sharing = host_weights.HostSharing.agree(peers, wanted, SHORT)
    if case == "one-wants":
        return "agreed", sharing.groups
    loader = "text_encoder" not in sharing.mapped
    try:
        with sharing.reporting_failure():
            if loader:
                torch.manual_seed(0)
                module = Tied()
                if case == "loader-fails":
                    raise RuntimeError("disk on fire")
            else:
                with torch.device("meta"):
                    module = Tied(width=6 if case == "different" else 8)
            block = sharing.share("text_encoder", module)
    except UserError as e:
        return "refused", str(e)
    torch.manual_seed(0)
    expected = Tied().state_dict()
    state = module.state_dict()
    return "shared", {
        "values_equal": all(torch.equal(state[k], expected[k]) for k in expected),
        "all_in_shared_memory": all(in_shared_memory(t) for t in state.values()),
        "tied": module.proj.weight is module.embed.weight,
        "dtypes": {k: str(v.dtype) for k, v in state.items()},
        "block_bytes": block.data.numel(),
        "loader": loader,
    }


# Each case and how many processes share a host in it.
CASES = {"ok": 3, "one-wants": 2, "loader-fails": 2, "different": 2}


def run_processes(cases: dict[str, int]) -> dict[str, dict[int, tuple[str, object]]]:
    """Every case's outcome by rank, from as many processes as the largest case needs, started once
    (spawning one costs seconds of imports), that go through the cases in turn, each at a store of its own."""
    context = mp.get_context("spawn")
    results = context.Queue()
    ports = [(case, size, free_port()) for case, size in cases.items()]
    processes = [context.Process(target=worker, args=(r, ports, results)) for r in range(max(cases.values()))]
    for p in processes:
        p.start()
    got: dict[str, dict[int, tuple[str, object]]] = {case: {} for case in cases}
    for _ in range(sum(cases.values())):
        case, rank, kind, payload = results.get(timeout=120)
        got[case][rank] = (kind, payload)
    for p in processes:
        p.join(timeout=60)
    return got


@pytest.fixture(scope="module")
def outcomes() -> dict[str, dict[int, tuple[str, object]]]:
    return run_processes(CASES)


def test_three_processes_hold_one_copy_with_ties_buffers_and_dtypes_kept(outcomes):
    got = outcomes["ok"]
    assert {kind for kind, _ in got.values()} == {"shared"}, got
    reports = {rank: payload for rank, (_, payload) in got.items()}
    assert [reports[r]["loader"] for r in range(3)] == [True, False, False]
    for report in reports.values():
        assert report["values_equal"] and report["all_in_shared_memory"] and report["tied"], report
        assert report["dtypes"]["scale"] == "torch.bfloat16"
        # embed/proj (one tensor), norm, scale: three page-aligned slots, the last 8 bf16 values.
        assert report["block_bytes"] == 2 * host_weights.ALIGNMENT + 8 * 2


def test_a_component_only_one_process_wants_is_not_shared(outcomes):
    got = outcomes["one-wants"]
    assert got == {0: ("agreed", {}), 1: ("agreed", {})}


def test_a_failed_load_is_reported_by_every_process_that_waited_for_it(outcomes):
    got = outcomes["loader-fails"]
    assert got[0][0] == "crashed" and "disk on fire" in got[0][1]
    kind, message = got[1]
    assert kind == "refused"
    assert message == "Local rank 0 could not load text_encoder for this host: RuntimeError: disk on fire"


def test_processes_that_built_different_models_are_refused_with_the_difference(outcomes):
    got = outcomes["different"]
    kind, message = got[1]
    assert kind == "refused"
    assert "built different text_encoder models" in message
    assert "memory.share_host_weights=false" in message


def test_layout_is_page_aligned_and_skips_none():
    slots = host_weights.layout(Tied())
    assert [s.name for s in slots] == ["embed.weight", "norm.weight", "scale"]
    assert all(s.offset % host_weights.ALIGNMENT == 0 for s in slots)


def test_a_lone_process_shares_nothing():
    sharing = host_weights.HostSharing.agree(HostPeers(0, 1, None, "h"), ["transformer"])
    assert sharing.groups == {} and sharing.mapped == []


def test_a_replica_that_loads_for_its_host_makes_the_same_video(tmp_path):
    """The loader's whole path in the replica (the other process simulated in the store): every
    component ends in shared pages, none pinned without a GPU, and the video is unchanged."""
    import numpy as np

    from batch_runner.replica.replica import Replica

    from .conftest import loader_of_a_two_process_host, run_config, tiny_job

    cfg = run_config("manifest=-", "model=tiny")
    job, images = tiny_job(tmp_path, steps=2)

    shared = Replica(cfg, torch.device("cpu"), loader_of_a_two_process_host())
    assert set(shared.shared) == {"text_encoder", "transformer", "vae"}
    assert not any(block.pinned for block in shared.shared.values())
    assert all(in_shared_memory(p) for p in shared.pipe.transformer.parameters())
    private = Replica(cfg, torch.device("cpu"))
    assert private.shared == {}
    made = [r.make(job, images, r.encode([job])) for r in (shared, private)]
    assert np.array_equal(made[0], made[1])
