"""What only LTX-Video does: the image as a condition at frame 0, masks beside the embeddings, the
Hub's pipeline class names, the model cards' defaults. The shared checks of every family are in
test_family_contract.py."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from diffusers import LTXConditionPipeline

from batch_runner.families import family_named
from batch_runner.replica.pipeline import build_pipeline, random_pipeline

from .conftest import run_config, tiny_job

FULL = "ltx-video-2b-0.9.5"
FULL_13B = "ltx-video-13b-0.9.7-dev"
FULL_SIZE = (FULL, FULL_13B)


# --- the family -----------------------------------------------------------------------------------


def test_the_rows_image_conditions_frame_zero(tmp_path):
    """0.9.5 and the 13B are trained with LTXConditionPipeline's conditioning: the image is a
    condition at frame 0, with the card's guidance rescale and decode settings."""
    model = run_config("manifest=x", "model=tiny-ltx").model
    job, images = tiny_job(tmp_path)
    embeds = {job.prompt: (torch.zeros(1, 4, 8), torch.ones(1, 4)), job.negative_prompt: None}
    arguments = family_named("ltx").call_arguments(model, replace(job, guidance_scale=1.0), images, embeds)
    assert "image" not in arguments
    [condition] = arguments["conditions"]
    assert condition.image is images["image"] and (condition.frame_index, condition.strength) == (0, 1.0)
    assert arguments["guidance_rescale"] == 0.7 and arguments["image_cond_noise_scale"] == 0.15
    assert (arguments["decode_timestep"], arguments["decode_noise_scale"]) == (0.05, 0.025)
    assert arguments["negative_prompt_embeds"] is None and arguments["negative_prompt_attention_mask"] is None


def test_the_diffusers_recipe_with_text_prompts_makes_the_runners_video(tmp_path):
    """The benchmark's references and the GPU test call the pipeline with the texts as text (their
    embeddings None); the family's arguments must take that and make the same video."""
    cfg = run_config("manifest=x", "model=tiny-ltx")
    family = family_named("ltx")
    job, images = tiny_job(tmp_path, steps=2)
    job = replace(job, guidance_scale=3.0)
    pipe = build_pipeline(cfg.model)
    texts = [job.prompt, job.negative_prompt]
    embeds = dict(zip(texts, family.encode_prompts(pipe, texts, cfg.model, torch.float32), strict=True))
    recipe = family.call_arguments(cfg.model, job, images, dict.fromkeys(texts))
    assert all(recipe[k] is None for k in recipe if k.endswith(("_embeds", "_attention_mask")))
    made = []
    for arguments, text in (
        (family.call_arguments(cfg.model, job, images, embeds), {}),
        (recipe, dict(prompt=job.prompt, negative_prompt=job.negative_prompt)),
    ):
        with torch.no_grad():
            generator = torch.Generator().manual_seed(1)
            made.append(pipe(**arguments, **text, generator=generator, output_type="pt").frames[0])
    torch.testing.assert_close(made[1], made[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("saved_as", ["LTXConditionPipeline", "LTXPipeline"])
def test_a_folder_saved_as_the_hubs_pipeline_class_loads_as_the_family(tmp_path, saved_as):
    """The hub's 0.9.7-dev folder names LTXConditionPipeline in model_index.json and 0.9.5's names
    LTXPipeline: both load, with every component, as the family's pipeline."""
    folder = tmp_path / "saved"
    build_pipeline(run_config("manifest=x", "model=tiny-ltx").model).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": saved_as}))
    model = run_config("manifest=x", "model=tiny-ltx", "model.weights=pretrained", f"model.path={folder}").model
    pipe = build_pipeline(model)
    assert type(pipe) is family_named("ltx").pipeline_class and isinstance(pipe, LTXConditionPipeline)
    assert set(family_named("ltx").components(pipe)) == {"text_encoder", "transformer", "vae"}


@pytest.mark.parametrize(
    ("name", "path", "frames", "size", "fps", "steps", "guidance"),
    [
        # Lightricks' configs/ltxv-2b-0.9.5.yaml and diffusers' LTXConditionPipeline example for 0.9.5.
        (FULL, "Lightricks/LTX-Video-0.9.5", 161, (512, 768), 24, 40, 3.0),
        # diffusers' LTX-Video page for 0.9.7-dev: its first pass (the upsampler's pass is not configured).
        (FULL_13B, "Lightricks/LTX-Video-0.9.7-dev", 161, (512, 768), 24, 30, 5.0),
    ],
)
def test_full_size_defaults_are_the_model_cards(name, path, frames, size, fps, steps, guidance):
    model = run_config("manifest=x", f"model={name}").model
    assert (model.family, model.path, model.dtype, model.scheduler) == ("ltx", path, "bfloat16", "euler")
    assert (model.num_frames, (model.height, model.width), model.fps) == (frames, size, fps)
    assert (model.num_inference_steps, model.guidance_scale) == (steps, guidance)
    assert (model.frame_multiple, model.max_frames, model.size_multiple) == (8, 257, 32)


@pytest.mark.parametrize("name", FULL_SIZE)
def test_the_random_builds_vae_compresses_32_pixels_and_8_frames(name):
    """The shared checks build it (test_family_contract.py); here its VAE's compression."""
    model = run_config("manifest=x", f"model={name}", "model.weights=random").model
    pipe = random_pipeline(model, torch.bfloat16, "meta")
    assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (32, 8)
