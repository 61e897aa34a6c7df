"""On a CUDA GPU (run on the device machine): every memory plan and the speed settings make the
same frames as memory=none, up to floating-point noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batch_runner.families.cogvideox import FAMILY
from batch_runner.replica.planner import PLANS, applies
from batch_runner.replica.replica import Replica, release_memory

from .conftest import loader_of_a_two_process_host, run_config, tiny_job

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# The plans the tiny CogVideoX can use (one transformer: no expert_offload).
TINY_PLANS = [p for p in PLANS if applies(p, FAMILY.roles)]


def frames_for(tmp_path, *overrides):
    cfg = run_config("manifest=-", "model=tiny", "model.dtype=bfloat16", *overrides)
    replica = Replica(cfg, torch.device("cuda"))
    job, images = tiny_job(tmp_path)
    frames = replica.make(job, images, replica.encode([job]))
    plan = replica.plan
    del replica
    release_memory()
    return frames.astype(np.int16), plan


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return frames_for(tmp_path_factory.mktemp("ref"), "memory=none", "speed.compile=off", "speed.fuse_qkv=false")[0]


@pytest.mark.parametrize("plan", TINY_PLANS)
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


def test_compiled_blocks_under_offloading_make_the_same_frames(tmp_path, reference):
    # Blocks are compiled before the plan's hooks wrap them, so streamed plans run compiled blocks too.
    frames, used = frames_for(tmp_path, "memory=group_offload", "speed.compile=on")
    assert used == "group_offload"
    assert np.abs(frames - reference).mean() < 1.0


def test_compiled_blocks_survive_a_plan_change(tmp_path, reference):
    """The out-of-memory fallback re-applies plans; the blocks must stay compiled and correct."""
    cfg = run_config("manifest=-", "model=tiny", "model.dtype=bfloat16", "memory=none", "speed.compile=on")
    replica = Replica(cfg, torch.device("cuda"))
    job, images = tiny_job(tmp_path)
    compiled = [block.forward for block in replica.pipe.transformer.transformer_blocks]
    assert replica.step_down() == "text_offload" and replica.step_down() == "group_offload"
    frames = replica.make(job, images, replica.encode([job])).astype(np.int16)
    assert np.abs(frames - reference).mean() < 1.0
    from batch_runner.replica.placement import remove_offloading

    remove_offloading(replica.pipe, replica.roles)
    assert [block.forward for block in replica.pipe.transformer.transformer_blocks] == compiled


def test_group_offload_streams_blocks_only(tmp_path):
    """The weights outside the blocks stay on the GPU: no blocking copy to pageable memory per step."""
    from torch.profiler import ProfilerActivity, profile

    cfg = run_config("manifest=-", "model=tiny", "model.dtype=bfloat16", "memory=group_offload")
    replica = Replica(cfg, torch.device("cuda"))
    job, images = tiny_job(tmp_path, steps=2)
    prompts = replica.encode([job])
    replica.make(job, images, prompts)  # the first pass records the blocks' order for prefetching
    transformer = replica.pipe.transformer
    steps = []
    transformer.register_forward_hook(lambda *_: steps.append(1))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replica.make(job, images, prompts)
    assert len(steps) == 2
    assert transformer.patch_embed.proj.weight.device.type == "cuda"
    assert transformer.transformer_blocks[0].ff.net[0].proj.weight.device.type == "cpu"
    to_pageable = [e for e in prof.events() if "Device -> Pageable" in e.name]
    # One copy back for the video's frames; none per denoising step.
    assert len(to_pageable) <= 1, [e.name for e in to_pageable]


def test_full_offload_streams_the_vae_too(tmp_path):
    """full_offload: the VAE's layers live on the host between uses, as the encoders' do (its frames
    are checked with every plan's, test_each_plan_makes_the_same_frames)."""
    cfg = run_config("manifest=-", "model=tiny", "model.dtype=bfloat16", "memory=full_offload", "speed.compile=off")
    replica = Replica(cfg, torch.device("cuda"))
    job, images = tiny_job(tmp_path)
    from diffusers.hooks.group_offloading import _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING

    for _ in range(2):
        replica.make(job, images, replica.encode([job]))
    convs = [m for m in replica.pipe.vae.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(m.weight.device.type == "cpu" for m in convs)
    # No prefetch tracing left on the VAE, whose forward is never called: it would grow per call.
    registries = [m._diffusers_hook for m in replica.pipe.vae.modules() if hasattr(m, "_diffusers_hook")]
    assert registries
    for name in (_LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
        assert all(r.get_hook(name) is None for r in registries)
    assert replica.pipe.transformer.transformer_blocks[0].ff.net[0].proj.weight.device.type == "cpu"


def test_full_offload_redoes_a_row_with_the_streamed_vae_in_float32(tmp_path):
    """The float32 redo of a row with bad frames, under the plan that streams the VAE: its layers are
    streamed from float32 copies for the redo, then from the same bfloat16 host tensors as before."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    cfg = run_config("manifest=-", "model=tiny", "model.dtype=bfloat16", "memory=full_offload", "speed.compile=off")
    replica = Replica(cfg, torch.device("cuda"))
    job, images = tiny_job(tmp_path)
    frames = replica.make(job, images, replica.encode([job]))
    vae = replica.pipe.vae

    def host_tensors() -> dict[str, tuple[int, torch.dtype]]:
        return {key: (t.data_ptr(), t.dtype) for key, t in vae.named_parameters() if t.device.type == "cpu"}

    host = host_tensors()
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]

    def copies_streamed() -> set[torch.dtype]:
        return {
            t.dtype for m in convs for t in m._diffusers_hook.get_hook(_GROUP_OFFLOADING).group.cpu_param_dict.values()
        }

    assert copies_streamed() == {torch.bfloat16}
    what, context = replica.higher_precision()
    assert what == "the VAE in float32"
    with context:
        assert copies_streamed() == {torch.float32}
        redone = replica.make(job, images, replica.encode([job]))
    # The same latents, decoded in float32 instead of bfloat16 (on the CPU: 0.45 levels apart on average).
    assert np.abs(redone.astype(np.int16) - frames.astype(np.int16)).mean() < 2
    assert host and host_tensors() == host
    assert copies_streamed() == {torch.bfloat16}
    assert all(m.weight.device.type == "cpu" for m in convs)
    again = replica.make(job, images, replica.encode([job]))
    assert np.abs(again.astype(np.int16) - frames.astype(np.int16)).max() <= 1  # bfloat16 again


def test_streamed_weights_shared_with_the_host_are_pinned_in_place(tmp_path, reference):
    """The loading process's path, with a second process of the host simulated in the store:
    group offloading streams from the shared pages themselves, page-locked, with no private copy."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    cfg = run_config("manifest=-", "model=tiny", "model.dtype=bfloat16", "memory=group_offload", "speed.compile=off")
    replica = Replica(cfg, torch.device("cuda"), loader_of_a_two_process_host())
    # The VAE, on the GPU under this plan, is not shared; the streamed two are.
    assert set(replica.shared) == {"text_encoder", "transformer"}
    block = replica.shared["transformer"]
    assert block.pinned and block.data.is_pinned()
    start, end = block.data.data_ptr(), block.data.data_ptr() + block.data.numel()
    group = replica.pipe.transformer.transformer_blocks[0]._diffusers_hook.get_hook(_GROUP_OFFLOADING).group
    assert group.cpu_param_dict
    assert all(start <= t.data_ptr() < end for t in group.cpu_param_dict.values())
    job, images = tiny_job(tmp_path)
    frames = replica.make(job, images, replica.encode([job])).astype(np.int16)
    assert np.abs(frames - reference).mean() < 1.0


def test_rows_of_two_shapes_switch_plans_and_make_the_same_frames(tmp_path, reference, monkeypatch):
    """A run whose shapes need different plans switches placement between rows (none -> group_offload
    -> none): each row's frames are those of memory=none, and the streamed component comes back to
    the very host tensors it left (no new copy)."""
    from dataclasses import replace

    from batch_runner.replica import planner

    cfg = run_config("manifest=-", "model=tiny", "model.dtype=bfloat16", "speed.compile=off", "speed.fuse_qkv=false")
    job, images = tiny_job(tmp_path)
    other = replace(job, id="y", guidance_scale=1.0)  # another shape: unguided
    fast, slow = planner.Placement("none", "test: fast"), planner.Placement("group_offload", "test: slow")
    plans = planner.RowPlans(((planner.shape_of(job), fast), (planner.shape_of(other), slow)), slow)
    monkeypatch.setattr(planner, "place", lambda *args, **kwargs: plans)
    replica = Replica(cfg, torch.device("cuda"), jobs=[job, other])
    first = replica.make(job, images, replica.encode([job])).astype(np.int16)
    assert replica.plan == "none"
    replica.make(other, images, replica.encode([other]))
    assert replica.plan == "group_offload"
    host = {n: t.data_ptr() for n, t in replica.pipe.transformer.transformer_blocks[0].state_dict().items()}
    again = replica.make(job, images, replica.encode([job])).astype(np.int16)
    assert replica.plan == "none"
    assert np.abs(first - reference).mean() < 1.0 and np.abs(again - reference).mean() < 1.0
    replica.make(other, images, replica.encode([other]))
    replica.prepare(other)
    from batch_runner.replica.placement import remove_offloading

    remove_offloading(replica.pipe, replica.roles)
    block = replica.pipe.transformer.transformer_blocks[0].state_dict()
    assert all(t.device.type == "cpu" for t in block.values())
    assert {n: t.data_ptr() for n, t in block.items()} == host
    del replica
    release_memory()
