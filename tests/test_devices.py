"""Each launched process of replica.gpus=1 sees only the GPU accelerate would give it, as its cuda:0."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import given
from hypothesis import strategies as st

from batch_runner.cluster import devices
from batch_runner.run import cli, runner
from tests.conftest import ROOT, photo, write_manifest

DRIVER_STARTED = devices.cuda_driver_started


@pytest.fixture(autouse=True)
def driver_not_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a process that has not started CUDA yet (a GPU test earlier in this session may have)."""
    monkeypatch.setattr(devices, "cuda_driver_started", lambda: False)


gpu_lists = st.lists(st.sampled_from(["0", "1", "2", "3", "5", "7", "GPU-3f2a", "MIG-9c1e"]), min_size=2, max_size=8)


@given(gpus=gpu_lists, local_rank=st.integers(0, 31))
def test_a_process_keeps_the_gpu_accelerate_would_give_it(gpus, local_rank):
    """accelerate gives local rank r the visible GPU r % count; narrowing the list keeps that GPU."""
    environ = {"LOCAL_RANK": str(local_rank), "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    assert devices.see_own_gpu_only(environ) == gpus[local_rank % len(gpus)]
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
    assert devices.see_own_gpu_only(environ) is None, why
    assert environ == before


def test_without_a_list_the_count_comes_from_nvml(monkeypatch):
    monkeypatch.setattr(devices, "nvml_gpu_count", lambda: 4)
    environ = {"LOCAL_RANK": "6"}
    assert devices.see_own_gpu_only(environ) == "2"
    assert environ["CUDA_VISIBLE_DEVICES"] == "2"
    for unknown in (-1, 1):  # NVML could not tell; one GPU only
        monkeypatch.setattr(devices, "nvml_gpu_count", lambda unknown=unknown: unknown)
        assert devices.see_own_gpu_only({"LOCAL_RANK": "1"}) is None


def test_once_the_driver_started_the_list_is_left_alone(monkeypatch):
    """It has read the list: narrowing it now would make every process take the same GPU as cuda:0."""
    monkeypatch.setattr(devices, "cuda_driver_started", lambda: True)
    environ = {"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert devices.see_own_gpu_only(environ) is None
    assert environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_without_a_driver_it_has_not_started():
    if not os.path.exists("/proc/driver/nvidia"):
        assert not DRIVER_STARTED()


@pytest.mark.parametrize(("gpus", "seen"), [(1, "6"), (2, "4,6")])
def test_the_run_narrows_a_replica_of_one_gpu_before_logging_imports_the_libraries(tmp_path, monkeypatch, gpus, seen):
    """A replica that spans GPUs keeps them all: its processes split each video over NCCL between them."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    at = {}
    monkeypatch.setattr(cli, "setup_logging", lambda *a: at.setdefault("logging", os.environ["CUDA_VISIBLE_DEVICES"]))
    monkeypatch.setattr(runner, "run", lambda cfg: at.setdefault("run", os.environ["CUDA_VISIBLE_DEVICES"]) and 0)
    row = {"id": "a", "image": str(photo(tmp_path / "a.png")), "prompt": "p"}
    manifest = write_manifest(tmp_path / "jobs.csv", [row])
    overrides = [f"manifest={manifest}", f"output_dir={tmp_path / 'out'}", "model=tiny", f"replica.gpus={gpus}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    assert cli.main(cfg) == 0
    assert at == {"logging": seen, "run": seen}


class FakeNvml:
    """libnvidia-ml's calls that devices.py makes, over GPUs of these compute capabilities."""

    def __init__(self, capabilities: list[tuple[int, int]], failing_index: int | None = None) -> None:
        self.capabilities, self.failing_index, self.open = capabilities, failing_index, 0

    def nvmlInit_v2(self) -> int:
        self.open += 1
        return 0

    def nvmlShutdown(self) -> int:
        self.open -= 1
        return 0

    def nvmlDeviceGetCount_v2(self, count) -> int:
        count._obj.value = len(self.capabilities)
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index: int, handle) -> int:
        handle._obj.value = 1000 + index
        return 0

    def nvmlDeviceGetCudaComputeCapability(self, handle, major, minor) -> int:
        index = handle.value - 1000
        if index == self.failing_index:
            return 999  # NVML_ERROR_UNKNOWN
        major._obj.value, minor._obj.value = self.capabilities[index]
        return 0


def test_compute_capabilities_are_read_through_nvml_and_it_is_shut_down(monkeypatch):
    nvml = FakeNvml([(9, 0), (9, 0), (8, 6)])
    monkeypatch.setattr(devices.ctypes, "CDLL", lambda name: nvml)
    assert devices.nvml_compute_capabilities() == {(9, 0), (8, 6)}
    assert devices.nvml_gpu_count() == 3
    assert nvml.open == 0
    nvml.failing_index = 1  # one GPU it cannot read: it cannot tell
    assert devices.nvml_compute_capabilities() == set()
    assert nvml.open == 0


def test_a_library_without_the_capability_call_tells_nothing_and_is_shut_down(monkeypatch):
    """ctypes raises AttributeError for a symbol an old driver's libnvidia-ml lacks: never the server's end."""

    class OldNvml(FakeNvml):
        def __getattribute__(self, name: str):
            if name == "nvmlDeviceGetCudaComputeCapability":
                raise AttributeError(f"libnvidia-ml.so.1: undefined symbol: {name}")
            return super().__getattribute__(name)

    nvml = OldNvml([(9, 0)])
    monkeypatch.setattr(devices.ctypes, "CDLL", lambda name: nvml)
    assert devices.nvml_compute_capabilities() == set()
    assert devices.nvml_gpu_count() == 1 and nvml.open == 0


def test_without_nvml_nothing_is_known(monkeypatch):
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(devices.ctypes, "CDLL", missing)
    assert devices.nvml_compute_capabilities() == set()
    assert devices.nvml_gpu_count() == -1
