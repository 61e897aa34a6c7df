"""On a CUDA GPU (run on the device machine): every memory plan and the speed settings make the
same frames as memory=none, up to floating-point noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batch_runner.images import load_image
from batch_runner.memory import PLANS
from batch_runner.replica import Replica, release_memory

from .conftest import photo, run_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def frames_for(tmp_path, *overrides):
    cfg = run_config("manifest=-", "model=tiny", "model.dtype=bfloat16", *overrides)
    replica = Replica(cfg, torch.device("cuda"))
    from batch_runner.manifest import Job

    job = Job(
        index=0,
        id="x",
        image=str(photo(tmp_path / "in.png")),
        prompt="a sea at night",
        negative_prompt="",
        seed=3,
        num_frames=9,
        height=64,
        width=96,
        fps=8.0,
        num_inference_steps=4,
        guidance_scale=6.0,
    )
    image = load_image(job.image, job.height, job.width, 10**8)
    frames = replica.make(job, image, replica.encode([job]))
    plan = replica.plan
    del replica
    release_memory()
    return frames.astype(np.int16), plan


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return frames_for(tmp_path_factory.mktemp("ref"), "memory=none", "speed.compile=off", "speed.fuse_qkv=false")[0]


@pytest.mark.parametrize("plan", PLANS)
def test_each_plan_makes_the_same_frames(tmp_path, reference, plan):
    frames, used = frames_for(tmp_path, f"memory={plan}", "speed.compile=off")
    assert used == plan
    assert np.abs(frames - reference).mean() < 1.0 and np.abs(frames - reference).max() <= 12


def test_compiled_blocks_make_the_same_frames(tmp_path, reference):
    frames, _ = frames_for(tmp_path, "memory=none", "speed.compile=on")
    assert np.abs(frames - reference).mean() < 1.0


@pytest.mark.parametrize("backend", ["flash", "efficient", "math"])
def test_attention_backends_make_the_same_frames(tmp_path, reference, backend):
    frames, _ = frames_for(tmp_path, "memory=none", "speed.compile=off", f"speed.attention={backend}")
    assert np.abs(frames - reference).mean() < 1.0


def test_budget_caps_the_allocator(tmp_path):
    frames_for(tmp_path, "memory=auto", "memory.budget_gib=2")
    total = torch.cuda.get_device_properties(0).total_memory
    assert torch.cuda.max_memory_reserved() <= 2 * 1024**3 or total < 2 * 1024**3
    torch.cuda.set_per_process_memory_fraction(1.0)
