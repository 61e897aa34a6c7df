"""What only Wan does: its options shape the tiny model, the A14B's two experts in the planner,
separate guidance passes, and a last frame that conditions the video. The shared checks of every
family are in test_family_contract.py."""

from __future__ import annotations

import pytest
import torch

from batch_runner.families import family_named
from batch_runner.inputs.images import load_image
from batch_runner.replica import planner
from batch_runner.replica.anatomy import anatomy
from batch_runner.replica.pipeline import build_pipeline
from batch_runner.replica.planner import auto_plan, workload_of

from .conftest import photo, run_config, tiny_job


@pytest.mark.parametrize(
    ("name", "two_experts", "ti2v"),
    [("tiny-wan", False, False), ("tiny-wan22", True, False), ("tiny-wan22-ti2v", False, True)],
)
def test_the_tiny_pipelines_shape_follows_the_options(name, two_experts, ti2v):
    model = run_config("manifest=x", f"model={name}").model
    pipe = build_pipeline(model)
    assert bool(pipe.config.get("expand_timesteps", False)) == ti2v
    assert (pipe.config.get("boundary_ratio") is not None) == two_experts
    # Turning the option off on the command line builds the other shape.
    if two_experts:
        plain = run_config("manifest=x", f"model={name}", "model.options.boundary_ratio=null").model
        assert build_pipeline(plain).transformer_2 is None


def test_the_low_noise_experts_guidance_reaches_the_call_only_where_it_is_set(tmp_path):
    job, images = tiny_job(tmp_path)
    family = family_named("wan")
    embeds = {job.prompt: torch.zeros(1, 4, 8), job.negative_prompt: torch.zeros(1, 4, 8)}
    a14b = run_config("manifest=x", "model=tiny-wan22", "model.options.guidance_scale_2=2.5").model
    assert family.call_arguments(a14b, job, images, embeds)["guidance_scale_2"] == 2.5
    plain = run_config("manifest=x", "model=tiny-wan22", "model.options.guidance_scale_2=null").model
    assert "guidance_scale_2" not in family.call_arguments(plain, job, images, embeds)


def test_a14b_keeps_one_expert_on_the_gpu_where_both_do_not_fit():
    cfg = run_config("manifest=x", "model=wan2.2-i2v-a14b", "memory.host_budget_gib=120")
    shape = anatomy(cfg.model)
    assert planner.applies("expert_offload", shape.roles)
    assert planner.host_resident("expert_offload", shape.roles) == ("text_encoder", "transformer")
    assert auto_plan(cfg, 48.0, 1).plan == "expert_offload"
    # One expert streamed weighs less on the GPU than two resident, more than both streamed.
    workload = workload_of(cfg)
    gpu = {p: planner.estimate(p, shape, workload, cfg.memory).gpu_gib for p in planner.LADDER}
    assert gpu["text_offload"] > gpu["expert_offload"] > gpu["group_offload"]
    # A model with one transformer has no such plan.
    single = anatomy(run_config("manifest=x", "model=wan2.1-i2v-14b-480p").model)
    assert not planner.applies("expert_offload", single.roles)
    assert planner.next_plan_down("text_offload", single.roles) == "group_offload"
    assert planner.next_plan_down("text_offload", shape.roles) == "expert_offload"


def test_separate_guidance_passes_halve_the_denoising_activations():
    """Wan runs the conditional and unconditional passes as two forwards; CogVideoX as one batch of 2."""
    cfg = run_config("manifest=x", "model=wan2.1-i2v-14b-480p")
    wan = anatomy(cfg.model)
    guided, unguided = (planner.shape_workload(cfg, wan, planner.Shape(81, 480, 832, guided=g)) for g in (True, False))
    assert guided == unguided and guided.batch == 1


def test_a_last_image_conditions_the_video(tmp_path):
    """A14B takes a last frame through its latents: same seed and prompt, other frames."""
    model = run_config("manifest=x", "model=tiny-wan22").model
    family = family_named("wan")
    pipe = build_pipeline(model)
    job, images = tiny_job(tmp_path, steps=2)
    last = load_image(str(photo(tmp_path / "last.png", (80, 120), seed=9)), job.height, job.width, 10**8)
    texts = [job.prompt, job.negative_prompt]
    embeds = dict(zip(texts, family.encode_prompts(pipe, texts, model, torch.float32), strict=True))
    made = []
    for last_image in (None, last):
        arguments = family.call_arguments(model, job, {**images, "last_image": last_image}, embeds)
        assert ("last_image" in arguments) == (last_image is not None)
        with torch.no_grad():
            made.append(pipe(**arguments, generator=torch.Generator().manual_seed(1), output_type="pt").frames[0])
    assert made[0].shape == made[1].shape and not torch.allclose(made[0], made[1])
