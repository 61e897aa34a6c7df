"""On a CUDA GPU (run on the device machine): for every Wan shape, LTX-Video, HunyuanVideo-1.5, LTX-2, SkyReels-V2,
Kandinsky 5 and Cosmos-Predict2.5, every memory plan and the speed settings make the frames of the diffusers reference
recipe (`pipe.to("cuda")`, the prompt given as text), same seed, up to bf16 noise."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from batch_runner.inputs.images import load_image
from batch_runner.inputs.manifest import Job
from batch_runner.replica.anatomy import anatomy
from batch_runner.replica.pipeline import build_pipeline
from batch_runner.replica.planner import PLANS, applies
from batch_runner.replica.replica import Replica, release_memory

from .conftest import run_config, tiny_job

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
MODELS = (
    "tiny-wan",
    "tiny-wan22",
    "tiny-wan22-ti2v",
    "tiny-ltx",
    "tiny-hunyuan15",
    "tiny-ltx2",
    "tiny-skyreels",
    "tiny-kandinsky5",
    "tiny-cosmos",
)
# Every plan, the reference recipes' offloads included: a plan the planner may choose must work for every family.
OURS = list(PLANS)


def job_for(tmp_path, name: str) -> tuple[Job, dict]:
    """conftest's tiny row at this model's default size and length (tiny-kandinsky5's is 17 frames, its least)."""
    model = run_config("manifest=-", f"model={name}").model
    job, _ = tiny_job(tmp_path)
    job = replace(
        job, num_frames=model.num_frames, height=model.height, width=model.width, fps=model.fps, guidance_scale=5.0
    )
    return job, {"image": load_image(job.image, job.height, job.width, 10**8), "last_image": None}


def ours(tmp_path, name: str, *overrides: str) -> tuple[np.ndarray, str]:
    cfg = run_config("manifest=-", f"model={name}", "model.dtype=bfloat16", *overrides)
    replica = Replica(cfg, torch.device("cuda"))
    job, images = job_for(tmp_path, name)
    frames = replica.make(job, images, replica.encode([job])).astype(np.int16)
    plan = replica.plan
    del replica
    release_memory()
    return frames, plan


@pytest.fixture(scope="module", params=MODELS)
def reference(request, tmp_path_factory):
    """diffusers' own recipe: the pipeline on the GPU, called with the prompt as text.

    Also returns the recipe's own bf16 noise: how far its frames move when its attention runs on
    PyTorch's math kernel instead (both exact). Over a tiny random model's few steps that is about
    one pixel level for some families, and it is what "up to bf16 noise" means for them.
    """
    name = request.param
    tmp_path = tmp_path_factory.mktemp(name)
    model = replace(run_config("manifest=-", f"model={name}").model, dtype="bfloat16")
    pipe = build_pipeline(model).to("cuda")
    job, images = job_for(tmp_path, name)
    family = anatomy(model).family
    arguments = family.call_arguments(model, job, images, {job.prompt: None, job.negative_prompt: None})
    # The texts as text: no embeddings, and no attention masks where the family passes them (LTX).
    text = {k: None for k in arguments if k.endswith(("_embeds", "_attention_mask"))}

    def frames_of_the_recipe(pipe) -> np.ndarray:
        with torch.no_grad():
            video = pipe(
                **arguments | text,
                prompt=job.prompt,
                negative_prompt=job.negative_prompt,
                generator=torch.Generator("cuda").manual_seed(job.seed),
                output_type="pt",
            ).frames[0]
        return (video * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy().astype(np.int16)

    frames = frames_of_the_recipe(pipe)
    with sdpa_kernel(SDPBackend.MATH):
        noise = float(np.abs(frames_of_the_recipe(pipe) - frames).mean())
    del pipe
    release_memory()
    return name, frames, noise


def close(frames: np.ndarray, reference: np.ndarray, mean: float = 1.0) -> bool:
    return frames.shape == reference.shape and np.abs(frames - reference).mean() < mean


def tolerance(noise: float, floor: float = 1.0) -> float:
    """`floor` pixel levels on average, or twice the recipe's own kernel-to-kernel noise where that is larger."""
    return max(floor, 2 * noise)


@pytest.mark.parametrize("plan", OURS)
def test_each_plan_makes_the_reference_frames(tmp_path, reference, plan):
    name, expected, noise = reference
    if not applies(plan, anatomy(run_config("manifest=-", f"model={name}").model).roles):
        pytest.skip(f"{plan} needs two experts")
    frames, used = ours(tmp_path, name, f"memory={plan}", "speed.compile=off")
    assert used == plan
    assert close(frames, expected, tolerance(noise)), (np.abs(frames - expected).mean(), noise)


def test_compiled_fused_cudnn_blocks_make_the_reference_frames(tmp_path, reference):
    name, expected, noise = reference
    for plan in ("none", "group_offload"):
        frames, _ = ours(tmp_path, name, f"memory={plan}", "speed.compile=on", "speed.attention=cudnn")
        # Inductor fuses and reorders bf16 arithmetic; over 4 steps of a random tiny model that
        # moves pixels by up to 1.5 on average (measured on an H100), still far from a wrong video.
        assert close(frames, expected, tolerance(noise, floor=2.0)), (plan, np.abs(frames - expected).mean(), noise)
