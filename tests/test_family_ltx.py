"""LTX-Video image-to-video: the tiny model end to end as a user runs it, its rules, its loading path,
and the full-size 2B and 13B architectures read and planned without weights."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import LTXConditionPipeline

from batch_runner.families import family_named
from batch_runner.replica import planner, speed
from batch_runner.replica.anatomy import anatomy
from batch_runner.replica.pipeline import build_pipeline, random_pipeline
from batch_runner.replica.planner import auto_plan

from .conftest import (
    made_by_one_process_and_by_two,
    made_from_a_saved_folder,
    ok,
    photo,
    run_cli,
    run_config,
    same_video,
    tiny_job,
    write_manifest,
)

FULL = "ltx-video-2b-0.9.5"
FULL_13B = "ltx-video-13b-0.9.7-dev"
FULL_SIZE = (FULL, FULL_13B)
BUDGETS = (80.0, 48.0, 24.0, 16.0, 12.0)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """Three rows on real image files: the default row, a longer one, a different seed."""
    image = photo(tmp_path / "in" / "first.png", (120, 80))
    rows = [
        {"id": "a", "image": str(image), "prompt": "the sea at night", "seed": 1},
        {"id": "b", "image": str(image), "prompt": "a car in the city", "num_frames": 17},
        {"id": "c", "image": str(image), "prompt": "light on the water", "seed": 5},
    ]
    return write_manifest(tmp_path / "jobs.csv", rows)


# --- the family -----------------------------------------------------------------------------------


def test_tiny_ltx_has_the_familys_components():
    model = run_config("manifest=x", "model=tiny-ltx").model
    pipe = build_pipeline(model)
    family = family_named("ltx")
    assert isinstance(pipe, family.pipeline_class) and isinstance(pipe, LTXConditionPipeline)
    assert (
        family.components(pipe)
        == anatomy(model).roles
        == {
            "text_encoder": "encoder",
            "transformer": "denoiser",
            "vae": "decoder",
        }
    )


def test_fused_projections_leave_an_ltx_video_unchanged(tmp_path):
    """The runner fuses QKV and drops the separate projections; LTX's stock processor reads those,
    so the family's processor must read the fused one (self- and cross-attention alike)."""
    cfg = run_config("manifest=x", "model=tiny-ltx")
    family = family_named("ltx")
    job, images = tiny_job(tmp_path, steps=2)
    job = replace(job, guidance_scale=3.0)
    made = []
    for fuse in (False, True):
        pipe = build_pipeline(cfg.model)
        if fuse:
            assert speed.fuse_qkv(pipe.transformer) > 0
        texts = [job.prompt, job.negative_prompt]
        embeds = dict(zip(texts, family.encode_prompts(pipe, texts, cfg.model, torch.float32), strict=True))
        arguments = family.call_arguments(cfg.model, job, images, embeds)
        assert arguments["prompt_attention_mask"].shape == arguments["negative_prompt_attention_mask"].shape
        with torch.no_grad():
            made.append(pipe(**arguments, generator=torch.Generator().manual_seed(1), output_type="pt").frames[0])
    torch.testing.assert_close(made[1], made[0], rtol=1e-4, atol=1e-4)


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
    assert type(pipe) is family_named("ltx").pipeline_class
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


@pytest.mark.parametrize(
    ("name", "transformer_b", "blocks", "width"), [(FULL, 1.9, 28, 2048), (FULL_13B, 13.0, 48, 4096)]
)
def test_full_size_anatomy_is_the_checkpoints_architecture(name, transformer_b, blocks, width):
    shape = anatomy(run_config("manifest=x", f"model={name}").model)
    billions = {n: b / 2 / 1e9 for n, b in shape.bytes.items()}  # bf16
    assert billions["transformer"] == pytest.approx(transformer_b, rel=0.1)
    assert billions["text_encoder"] == pytest.approx(4.76, rel=0.05)  # T5-XXL encoder
    assert billions["vae"] == pytest.approx(1.25, rel=0.05)  # 0.9.7 keeps 0.9.5's VAE
    assert shape.blocks == blocks and shape.geometry.hidden == width
    assert shape.family.activations.guidance_batch == 2
    # 161 frames -> 21 latent frames; 512x768 -> 16x24 latents of 32x32 pixels, one token each;
    # the text stays out of the sequence.
    assert shape.geometry.tokens(161, 512, 768, 128) == 21 * 16 * 24


@pytest.mark.parametrize("name", FULL_SIZE)
def test_the_benchmarks_random_build_is_the_familys_pipeline(name):
    """scripts/benchmark.py builds conf/arch/<arch> with random weights on the GPU; on the meta
    device the same code checks the architecture files and the pipeline's assembly."""
    model = run_config("manifest=x", f"model={name}", "model.weights=random").model
    pipe = random_pipeline(model, torch.bfloat16, "meta")
    assert type(pipe) is family_named("ltx").pipeline_class
    assert len(pipe.transformer.transformer_blocks) == anatomy(model).blocks
    assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (32, 8)


@pytest.mark.parametrize("name", FULL_SIZE)
@pytest.mark.parametrize("budget", BUDGETS)
def test_auto_picks_a_plan_that_fits_every_budget(name, budget):
    cfg = run_config("manifest=x", f"model={name}", "memory.host_budget_gib=120")
    choice = auto_plan(cfg, budget, 1)
    chosen = next(e for e in choice.estimates if e.plan == choice.plan)
    assert chosen.gpu_gib <= budget
    assert choice.plan in planner.LADDER and choice.plan != "sequential_cpu_offload", choice.reason
    faster = planner.LADDER[: planner.LADDER.index(choice.plan)]
    assert all(e.gpu_gib > budget for e in choice.estimates if e.plan in faster)


# --- rows -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("tiny-ltx", 12, "tiny-ltx makes 8N+1 frames, 9 to 49, not 12; the nearest valid value is 9"),
        (FULL, 121 + 4, f"{FULL} makes 8N+1 frames, 9 to 257, not 125; the nearest valid value is 129"),
        (FULL_13B, 100, f"{FULL_13B} makes 8N+1 frames, 9 to 257, not 100; the nearest valid value is 97"),
    ],
)
def test_a_frame_count_the_model_cannot_make_is_refused_by_name(tmp_path, name, value, message):
    image = photo(tmp_path / "in.png")
    rows = [
        {"id": "ok", "image": str(image), "prompt": "sea"},
        {"id": "bad", "image": str(image), "prompt": "sea", "num_frames": value},
    ]
    extra = ["dry_run=true"] if name in FULL_SIZE else []
    proc = run_cli(f"manifest={write_manifest(tmp_path / 'j.csv', rows)}", f"model={name}", *extra, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "'bad'" in proc.stderr and message in proc.stderr, proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_size_off_the_32_pixel_grid_is_refused_with_the_nearest(tmp_path):
    image = photo(tmp_path / "in.png")
    rows = [{"id": "odd", "image": str(image), "prompt": "sea", "width": 100}]
    proc = run_cli(f"manifest={write_manifest(tmp_path / 'j.csv', rows)}", "model=tiny-ltx", cwd=tmp_path)
    assert proc.returncode == 2
    assert "multiples of 32" in proc.stderr and "width=96 height=64" in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", FULL_SIZE)
def test_dry_run_plans_the_full_size_model_with_no_weights(tmp_path, manifest, name):
    proc = run_cli(
        f"manifest={manifest}",
        f"model={name}",
        "dry_run=true",
        "memory.budget_gib=24",
        "memory.host_budget_gib=120",
        "on_invalid=skip",
        cwd=tmp_path,
    )
    ok(proc)
    assert "memory plan: " in proc.stdout and "no model loaded" in proc.stdout
    assert not (tmp_path / "outputs").exists()


# --- end to end, as a user runs it ----------------------------------------------------------------


@pytest.mark.slow
def test_tiny_ltx_makes_every_row_in_one_process_and_in_two(tmp_path, manifest):
    _, frames = made_by_one_process_and_by_two(tmp_path, manifest, "model=tiny-ltx", "output.crf=0")
    assert frames["a"].shape == (9, 64, 96, 3) and frames["b"].shape == (17, 64, 96, 3)
    assert not same_video(frames["a"], frames["c"])  # another seed and prompt


@pytest.mark.slow
def test_a_saved_ltx_pipeline_loads_through_model_path_and_makes_the_same_video(tmp_path, manifest):
    def as_the_hubs_13b(folder: Path) -> None:  # the class name the Hub's 13B folder gives its pipeline
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "LTXConditionPipeline"}))

    assert same_video(*made_from_a_saved_folder(tmp_path, manifest, "tiny-ltx", "a", edit=as_the_hubs_13b))
