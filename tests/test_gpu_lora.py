"""On a CUDA GPU (run on the device machine): LoRAs fused at start make the frames of the model cards'
diffusers recipe, the LoRAs loaded unfused with `load_lora_weights` (`pipe.to("cuda")`, the prompt
given as text), in bf16, up to bf16 noise. tests/test_lora.py checks the same in float32 on the CPU."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from batch_runner.inputs.images import load_image
from batch_runner.replica import lora as loras
from batch_runner.replica.anatomy import anatomy
from batch_runner.replica.pipeline import build_pipeline
from batch_runner.replica.replica import Replica, release_memory

from .conftest import run_config, tiny_job

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TWINS = ("tiny-wan-lightx2v", "tiny-wan22-lightning")


@pytest.fixture(autouse=True)
def lora_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCH_RUNNER_CACHE", str(tmp_path / "cache"))


def row(tmp_path, model):
    job, _ = tiny_job(tmp_path)
    job = replace(job, height=model.height, width=model.width, fps=model.fps, guidance_scale=model.guidance_scale)
    job = replace(job, num_inference_steps=model.num_inference_steps)
    return job, {"image": load_image(job.image, job.height, job.width, 10**8), "last_image": None}


def as_uint8(video: torch.Tensor) -> np.ndarray:
    return (video * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy().astype(np.int16)


def card_recipe(tmp_path, name: str, with_loras: bool = True, fuse: bool = False) -> np.ndarray:
    """The plain bf16 pipeline on the GPU, each LoRA loaded as an adapter (unfused, or fused by
    diffusers' own `fuse_lora` with `fuse`), prompt as text."""
    model = replace(run_config("manifest=-", f"model={name}").model, dtype="bfloat16")
    pipe = build_pipeline(replace(model, loras=[])).to("cuda")
    if with_loras:
        for number, lora in enumerate(loras.resolve(model)):
            pipe.load_lora_weights(str(lora.file), adapter_name=f"a{number}", **lora.load_arguments)
            if fuse:
                pipe.fuse_lora(components=[lora.component], lora_scale=lora.entry.scale, adapter_names=[f"a{number}"])
                pipe.unload_lora_weights()
    job, images = row(tmp_path, model)
    family = anatomy(model).family
    arguments = family.call_arguments(model, job, images, {job.prompt: None, job.negative_prompt: None})
    text = {k: None for k in arguments if k.endswith(("_embeds", "_attention_mask"))}
    with torch.no_grad():
        video = pipe(
            **arguments | text,
            prompt=job.prompt,
            negative_prompt=None,  # guidance 1: one branch
            generator=torch.Generator("cuda").manual_seed(job.seed),
            output_type="pt",
        ).frames[0]
    del pipe
    release_memory()
    return as_uint8(video)


def fused(tmp_path, name: str, *overrides: str) -> np.ndarray:
    cfg = run_config("manifest=-", f"model={name}", "model.dtype=bfloat16", *overrides)
    replica = Replica(cfg, torch.device("cuda"))
    assert not any("lora" in n for d in replica.denoisers for n, _ in d.named_modules()), "adapters left behind"
    job, images = row(tmp_path, cfg.model)
    frames = replica.make(job, images, replica.encode([job])).astype(np.int16)
    del replica
    release_memory()
    return frames


@pytest.mark.parametrize("name", TWINS)
def test_fused_loras_make_the_frames_of_the_cards_unfused_recipe_in_bf16(tmp_path, name):
    expected = card_recipe(tmp_path, name)
    without = card_recipe(tmp_path, name, with_loras=False)
    # bf16 noise here is what fusing costs: the fused weight rounds W + BA once, where the recipe adds
    # x(BA) to xW every step. diffusers' own fuse_lora, on the plain pipeline, measures it.
    fusing = float(np.abs(card_recipe(tmp_path, name, fuse=True) - expected).mean())
    allowed = max(1.0, 1.5 * fusing)
    # Twice the tolerance, so that frames made without the LoRAs fail (float32 on the CPU: 6.2 and 4.5).
    assert np.abs(expected - without).mean() > 2 * allowed, "the LoRAs changed too little for this test to tell"
    for overrides in (("memory=none", "speed.compile=off"), ("memory=group_offload", "speed.compile=off")):
        frames = fused(tmp_path, name, *overrides)
        assert frames.shape == expected.shape
        assert np.abs(frames - expected).mean() < allowed, (overrides, np.abs(frames - expected).mean(), fusing)


@pytest.mark.parametrize("name", TWINS)
def test_fused_loras_compiled_on_cudnn_make_the_cards_frames(tmp_path, name):
    expected = card_recipe(tmp_path, name)
    frames = fused(tmp_path, name, "memory=none", "speed.compile=on", "speed.attention=cudnn")
    # Inductor reorders bf16 arithmetic (see test_gpu_families): a looser bound, far from a wrong video.
    assert np.abs(frames - expected).mean() < 2.0, np.abs(frames - expected).mean()
