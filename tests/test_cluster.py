"""Each launched process of replica.gpus=1 sees only the GPU accelerate would give it, as cuda:0."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batch_runner import cluster, runner
from tests.conftest import photo, run_config, write_manifest

gpu_lists = st.lists(st.sampled_from(["0", "1", "2", "3", "5", "7", "GPU-3f2a", "MIG-9c1e"]), min_size=2, max_size=8)


@given(gpus=gpu_lists, local_rank=st.integers(0, 31))
def test_a_process_keeps_the_gpu_accelerate_would_give_it(gpus, local_rank):
    """accelerate gives local rank r the visible GPU r % count; narrowing the list keeps that GPU."""
    environ = {"LOCAL_RANK": str(local_rank), "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    assert cluster.see_own_gpu_only(environ) == gpus[local_rank % len(gpus)]
    assert environ["CUDA_VISIBLE_DEVICES"] == gpus[local_rank % len(gpus)]


@pytest.mark.parametrize(
    ("environ", "why"),
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, "not started by a launcher"),
        ({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "3"}, "one GPU already"),
        ({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "-1"}, "no GPU visible"),
        ({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "2,-1,3"}, "CUDA reads up to the first entry that is not a GPU"),
        ({"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""}, "an empty list hides every GPU"),
    ],
)
def test_nothing_is_narrowed_where_there_is_nothing_to_choose(environ, why):
    before = dict(environ)
    assert cluster.see_own_gpu_only(environ) is None, why
    assert environ == before


def test_without_a_list_the_count_comes_from_nvml_without_starting_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    with mock.patch.object(torch.cuda, "_device_count_nvml", return_value=4) as nvml:
        environ = {"LOCAL_RANK": "6"}
        assert cluster.see_own_gpu_only(environ) == "2"
        assert environ["CUDA_VISIBLE_DEVICES"] == "2"
        nvml.assert_called_once()
    for unknown in (-1, 1):  # NVML could not tell; one GPU only
        with mock.patch.object(torch.cuda, "_device_count_nvml", return_value=unknown):
            assert cluster.see_own_gpu_only({"LOCAL_RANK": "1"}) is None


def test_once_cuda_started_the_list_is_left_alone(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    environ = {"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert cluster.see_own_gpu_only(environ) is None
    assert environ["CUDA_VISIBLE_DEVICES"] == "0,1"


@pytest.mark.parametrize(("gpus", "narrowed"), [(1, True), (2, False)])
def test_the_run_narrows_only_a_replica_of_one_gpu(tmp_path, monkeypatch, gpus, narrowed):
    """A replica that spans GPUs keeps them all: its processes split each video over NCCL between them."""
    seen = []
    monkeypatch.setattr(cluster, "see_own_gpu_only", lambda: seen.append(True))
    monkeypatch.setattr(runner, "check_settings", lambda cfg: None)  # replica.gpus=2 needs 2 processes
    monkeypatch.setattr(runner.compile_cache, "configure", lambda *args: None)
    monkeypatch.setattr(runner, "_run", lambda cfg, c: 0)
    row = {"id": "a", "image": str(photo(tmp_path / "a.png")), "prompt": "p"}
    manifest = write_manifest(tmp_path / "jobs.csv", [row])
    cfg = run_config(f"manifest={manifest}", f"output_dir={tmp_path / 'out'}", "model=tiny", f"replica.gpus={gpus}")
    assert runner.run(cfg) == 0
    assert seen == ([True] if narrowed else [])
