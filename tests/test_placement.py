"""Placement on the CPU, with diffusers' real group-offloading hooks (no streams there: plain copies).

The CUDA path, where group offloading onloads from host copies it pinned, is tests/test_gpu.py's."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batch_runner import upstream
from batch_runner.families import family_of
from batch_runner.replica import placement, planner

from .conftest import run_config

CPU = torch.device("cpu")


def streamed_tiny_vae():
    """The tiny twin's pipeline and its family, the VAE in bfloat16, streamed layer by layer as
    full_offload streams it."""
    model = run_config("manifest=unused.csv", "model=tiny").model
    family = family_of(model)
    pipe = family.tiny(model)
    pipe.vae.to(torch.bfloat16)
    placement.stream_layers(pipe.vae, CPU)
    return family, pipe


def decoded(vae) -> torch.Tensor:
    latents = torch.randn(1, vae.config.latent_channels, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return vae.decode(latents.to(torch.bfloat16)).sample


def hooked(vae) -> bool:
    return any(upstream.group_offloading_hook(m) is not None for m in vae.modules() if m is not vae)


def host_tensors(vae) -> dict[str, tuple[int, torch.dtype]]:
    return {key: (t.data_ptr(), t.dtype) for key, t in [*vae.named_parameters(), *vae.named_buffers()]}


def test_a_streamed_vae_is_cast_streamed_anew_and_put_back_on_its_own_host_tensors():
    family, pipe = streamed_tiny_vae()
    vae = pipe.vae
    before, frames = host_tensors(vae), decoded(vae)
    what, cast = family.higher_precision(pipe)
    assert what == "the VAE in float32"

    with placement.streamed_anew([vae], CPU, cast):
        assert hooked(vae)
        assert {t.dtype for t in vae.parameters()} == {torch.float32}
        assert decoded(vae).dtype == torch.float32  # bfloat16 latents met float32 weights

    assert host_tensors(vae) == before  # the same host tensors, in bfloat16: nothing copied
    assert hooked(vae)
    assert torch.equal(decoded(vae), frames)


def test_a_failure_inside_leaves_the_vae_streamed_as_it_was():
    family, pipe = streamed_tiny_vae()
    before = host_tensors(pipe.vae)
    _, cast = family.higher_precision(pipe)
    with pytest.raises(RuntimeError, match="the redo failed"), placement.streamed_anew([pipe.vae], CPU, cast):
        raise RuntimeError("the redo failed")
    assert host_tensors(pipe.vae) == before
    assert hooked(pipe.vae)


def test_a_failure_in_the_cast_leaves_the_vae_streamed_as_it_was():
    _, pipe = streamed_tiny_vae()
    before = host_tensors(pipe.vae)

    @contextlib.contextmanager
    def failing_cast():
        raise RuntimeError("no room for the cast")
        yield

    with pytest.raises(RuntimeError, match="no room"), placement.streamed_anew([pipe.vae], CPU, failing_cast()):
        pass
    assert host_tensors(pipe.vae) == before
    assert hooked(pipe.vae)


@pytest.mark.parametrize("name", placement.ALLOCATOR_ENV)
def test_a_users_own_garbage_collection_threshold_stands(monkeypatch, name):
    for each in placement.ALLOCATOR_ENV:
        monkeypatch.delenv(each, raising=False)
    ours = "garbage_collection_threshold:0.7"
    assert placement.allocator_settings(16.0, 8.0) == ours
    monkeypatch.setenv(name, "expandable_segments:True")  # another setting: ours still goes in
    assert placement.allocator_settings(16.0, 8.0) == ours
    monkeypatch.setenv(name, "expandable_segments:True,garbage_collection_threshold:0.95")
    assert placement.allocator_settings(16.0, 8.0) is None


@given(cap=st.floats(1.0, 200.0), share=st.floats(0.0, 1.5) | st.none())
def test_the_allocator_collects_only_above_what_the_plan_holds(cap, share):
    """Past the threshold every new segment first frees the unused cached blocks: below what the plan
    holds live it would do so at every segment (LTX-2's group_offload plans 12.17 GiB of a 16 GiB cap,
    above 0.7 of it)."""
    planned = None if share is None else share * cap
    threshold = placement.gc_threshold(cap, planned)
    assert placement.GC_THRESHOLD <= threshold <= placement.GC_THRESHOLD_MAX < 1.0  # torch refuses 1.0
    if planned is not None and planned <= placement.GC_THRESHOLD_MAX * cap:
        assert threshold * cap >= planned - 0.001 * cap  # rounded to three places
    if planned is None or planned <= placement.GC_THRESHOLD * cap:
        assert threshold == placement.GC_THRESHOLD  # as measured at 8 GiB (docs/experiments/allocator_cap.json)


def test_ltx2_group_offload_under_16_gib_collects_above_its_planned_need():
    """The case that set this rule: the plan holds more than 0.7 of the cap (the planner's estimate)."""
    cfg = run_config("manifest=x.csv", "model=ltx-2", "memory.plan=group_offload", "memory.host_budget_gib=120")
    planned = planner.plan_rows(cfg, 16.0, 1).planned_gib
    assert planned > placement.GC_THRESHOLD * 16.0
    assert placement.gc_threshold(16.0, planned) * 16.0 >= planned - 0.01
