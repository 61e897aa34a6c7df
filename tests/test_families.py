"""Model families: each one works through the same command line, rules, loading path and planner.

The CogVideoX end-to-end runs live in test_cli.py; here every Wan shape (2.1 with its image encoder,
2.2 A14B with two experts, 2.2 TI2V with expand_timesteps) runs as a user would run it, and the
interface itself is held to its promise: no module outside batch_runner/families names a model class.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from batch_runner.families import FAMILY_MODULES, family_named
from batch_runner.replica import planner
from batch_runner.replica.anatomy import anatomy
from batch_runner.replica.pipeline import build_pipeline
from batch_runner.replica.planner import auto_plan, workload_of

from .conftest import (
    ROOT,
    accelerate_cpu,
    frames_of,
    made_from_a_saved_folder,
    ok,
    photo,
    run_cli,
    run_config,
    write_manifest,
)

TINY_WAN = ("tiny-wan", "tiny-wan22", "tiny-wan22-ti2v")
FULL_SIZE = {
    "cogvideox-5b-i2v": "cogvideox",
    "cogvideox1.5-5b-i2v": "cogvideox",
    "wan2.1-i2v-14b-480p": "wan",
    "wan2.1-i2v-14b-720p": "wan",
    "wan2.2-ti2v-5b": "wan",
    "wan2.2-i2v-a14b": "wan",
}
BUDGETS = (80.0, 48.0, 24.0, 16.0, 12.0)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """Three rows on real image files: the model's default row, a longer one, a different seed."""
    first, last = photo(tmp_path / "in" / "first.png", (120, 80)), photo(tmp_path / "in" / "last.jpg", (90, 60), seed=3)
    rows = [
        {"id": "a", "image": str(first), "prompt": "the sea at night", "seed": 1},
        {"id": "b", "image": "in/last.jpg", "prompt": "a car in the city", "num_frames": 13},
        {"id": "c", "image": str(first), "prompt": "light on the water", "seed": 5},
    ]
    del last
    return write_manifest(tmp_path / "jobs.csv", rows)


# --- the interface --------------------------------------------------------------------------------


def test_no_module_outside_the_families_names_a_model_class():
    pattern = re.compile(
        r"(CogVideoX|Wan|LTX|HunyuanVideo)[A-Za-z0-9]*(Pipeline|Transformer3DModel|Scheduler|Autoencoder)"
    )
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "batch_runner").rglob("*.py")
        if "families" not in path.parts and pattern.search(path.read_text())
    ]
    assert offenders == []


def test_every_model_config_names_a_family_module():
    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        cfg = run_config("manifest=x", f"model={path.stem}")
        assert cfg.model.family in FAMILY_MODULES, path.name
    assert run_config("manifest=x", "model=tiny").model.name == "tiny-cogvideox"  # the quickstart's alias


@pytest.mark.parametrize("name", (*TINY_WAN, "tiny-cogvideox"))
def test_tiny_pipelines_have_their_familys_components(name):
    model = run_config("manifest=x", f"model={name}").model
    pipe = build_pipeline(model)
    family = family_named(model.family)
    assert isinstance(pipe, family.pipeline_class)
    roles = family.components(pipe)
    assert roles == anatomy(model).roles
    expected = {
        "tiny-wan": {"text_encoder", "image_encoder", "transformer", "vae"},
        "tiny-wan22": {"text_encoder", "transformer", "transformer_2", "vae"},
        "tiny-wan22-ti2v": {"text_encoder", "transformer", "vae"},
        "tiny-cogvideox": {"text_encoder", "transformer", "vae"},
    }[name]
    assert set(roles) == expected
    assert bool(pipe.config.get("expand_timesteps", False)) == model.expand_timesteps


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_anatomy_is_read_from_the_architecture_without_weights(name):
    model = run_config("manifest=x", f"model={name}").model
    shape = anatomy(model)
    billions = {n: b / 2 / 1e9 for n, b in shape.bytes.items()}  # bf16
    denoisers = shape.of_role("denoiser")
    # Parameters per transformer: CogVideoX 5.6B; Wan 2.1 I2V 16.4B (its image cross-attention
    # included), each A14B expert 14.3B, TI2V 5.0B.
    expected_b = 5.6 if name.startswith("cog") else 5.0 if "5b" in name else 14.3 if "a14b" in name else 16.4
    for d in denoisers:
        assert billions[d] == pytest.approx(expected_b, rel=0.1), (name, billions)
    assert len(denoisers) == (2 if "a14b" in name else 1)
    assert ("image_encoder" in shape.roles) == name.startswith("wan2.1")
    assert shape.blocks == {"cogvideox": 42, "wan": 30 if "5b" in name else 40}[FULL_SIZE[name]]


# --- the planner per family -----------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in FULL_SIZE if n.startswith("wan")])
@pytest.mark.parametrize("budget", BUDGETS)
def test_auto_picks_a_plan_that_fits_every_budget_for_every_wan_model(name, budget):
    cfg = run_config("manifest=x", f"model={name}", "memory.host_budget_gib=120")
    choice = auto_plan(cfg, budget, 1)
    chosen = next(e for e in choice.estimates if e.plan == choice.plan)
    assert chosen.gpu_gib <= budget
    assert choice.plan in planner.LADDER and choice.plan != "sequential_cpu_offload", choice.reason
    # Nothing faster would have fitted.
    faster = planner.LADDER[: planner.LADDER.index(choice.plan)]
    assert all(e.gpu_gib > budget for e in choice.estimates if e.plan in faster)


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
    wan = anatomy(run_config("manifest=x", "model=wan2.1-i2v-14b-480p").model)
    cog = anatomy(run_config("manifest=x", "model=cogvideox-5b-i2v").model)
    assert wan.family.activations.guidance_batch == 1 and cog.family.activations.guidance_batch == 2
    workload = workload_of(run_config("manifest=x", "model=wan2.1-i2v-14b-480p"))
    guided, unguided = (
        planner.activation_gib(replace(workload, guidance=g), wan.family.activations, True, False)[0]
        for g in (True, False)
    )
    assert guided == unguided


def test_wan_tokens_leave_the_text_out_of_the_sequence():
    shape = anatomy(run_config("manifest=x", "model=wan2.1-i2v-14b-480p").model)
    # 81 frames -> 21 latent frames; 480x832 -> 30x52 tokens of 2x2 latents of 8x8 pixels.
    assert shape.geometry.tokens(81, 480, 832, 512) == 21 * 30 * 52
    ti2v = anatomy(run_config("manifest=x", "model=wan2.2-ti2v-5b").model)
    assert ti2v.geometry.tokens(121, 704, 1280, 512) == 31 * 22 * 40  # 16x16 pixels per latent


# --- rows: rules and the last frame ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "column", "value", "message"),
    [
        ("tiny-wan", "num_frames", 12, "4N+1 frames, 5 to 81, not 12; the nearest valid value is 13"),
        ("tiny-wan", "width", 100, "the nearest valid size is width=96 height=64"),
        ("tiny-wan22-ti2v", "width", 112, "multiples of 32"),
    ],
)
def test_a_row_the_model_cannot_make_is_refused_by_name(tmp_path, name, column, value, message):
    image = photo(tmp_path / "in.png")
    rows = [{"id": "ok", "image": str(image), "prompt": "sea"}, {"id": "bad", "image": str(image), "prompt": "sea"}]
    rows[1][column] = value
    proc = run_cli(f"manifest={write_manifest(tmp_path / 'j.csv', rows)}", f"model={name}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "row 2 (id 'bad')" in proc.stderr or "'bad'" in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_full_size_wan_rule_names_the_nearest_frame_count(tmp_path):
    image = photo(tmp_path / "in.png")
    rows = [{"id": "long", "image": str(image), "prompt": "sea", "num_frames": 100}]
    proc = run_cli(
        f"manifest={write_manifest(tmp_path / 'j.csv', rows)}",
        "model=wan2.1-i2v-14b-480p",
        "dry_run=true",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "4N+1 frames, 5 to 81, not 100; the nearest valid value is 81" in proc.stderr


@pytest.mark.parametrize("name", ["tiny-cogvideox", "tiny-wan", "tiny-wan22-ti2v"])
def test_last_image_is_refused_where_the_model_takes_no_last_frame(tmp_path, name):
    image = photo(tmp_path / "in.png")
    rows = [{"id": "x", "image": str(image), "last_image": str(image), "prompt": "sea"}]
    proc = run_cli(f"manifest={write_manifest(tmp_path / 'j.csv', rows)}", f"model={name}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "last_image" in proc.stderr and "first frame only" in proc.stderr


@pytest.mark.slow
def test_last_image_makes_a_first_last_frame_video(tmp_path):
    first, last = photo(tmp_path / "first.png", seed=1), photo(tmp_path / "last.png", (80, 120), seed=9)
    rows = [
        {"id": "plain", "image": str(first), "prompt": "sea", "seed": 3},
        {"id": "ends", "image": str(first), "last_image": "last.png", "prompt": "sea", "seed": 3},
    ]
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "j.csv", rows)
    ok(run_cli(f"manifest={manifest}", "model=tiny-wan22", f"output_dir={out}", cwd=tmp_path))
    table = pd.read_parquet(out / "results.parquet").set_index("id")
    assert set(table["status"]) == {"ok"}
    assert table.loc["ends", "last_image"] == str(last.resolve())
    assert pd.isna(table.loc["plain", "last_image"])
    # The last frame conditions the video: same seed and prompt, different frames.
    assert not np.array_equal(frames_of(out / "videos/plain.mp4"), frames_of(out / "videos/ends.mp4"))


# --- end to end, as a user runs it ----------------------------------------------------------------


@pytest.mark.slow
def test_tiny_wan_makes_every_row_with_two_processes(tmp_path, manifest):
    out = tmp_path / "out"
    ok(run_cli(f"manifest={manifest}", "model=tiny-wan", f"output_dir={out}", launcher=accelerate_cpu(2), cwd=tmp_path))
    table = pd.read_parquet(out / "results.parquet").set_index("id")
    assert set(table["status"]) == {"ok"} and sorted(table.index) == ["a", "b", "c"]
    assert set(table["rank"]) <= {0, 1}
    frames = {i: frames_of(out / f"videos/{i}.mp4") for i in "abc"}
    assert frames["a"].shape == (9, 64, 96, 3) and frames["b"].shape == (13, 64, 96, 3)
    # The same row made by one process is the same video: placement does not change outputs.
    single = tmp_path / "single"
    ok(run_cli(f"manifest={manifest}", "model=tiny-wan", f"output_dir={single}", "ids=[a]", cwd=tmp_path))
    assert np.array_equal(frames_of(single / "videos/a.mp4"), frames["a"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-wan22", "tiny-wan22-ti2v"])
def test_wan22_shapes_make_every_row(tmp_path, manifest, name):
    out = tmp_path / "out"
    ok(run_cli(f"manifest={manifest}", f"model={name}", f"output_dir={out}", cwd=tmp_path))
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["status"]) == {"ok"} and len(table) == 3
    height, width = (64, 128) if name.endswith("ti2v") else (64, 96)
    assert frames_of(out / "videos/b.mp4").shape == (13, height, width, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-wan", "tiny-wan22"])
def test_a_saved_wan_pipeline_loads_through_model_path_and_makes_the_same_video(tmp_path, manifest, name):
    assert np.array_equal(*made_from_a_saved_folder(tmp_path, manifest, name, "a"))


@pytest.mark.parametrize("name", [n for n in FULL_SIZE if n.startswith("wan")])
def test_dry_run_plans_each_full_size_wan_model_with_no_weights(tmp_path, manifest, name):
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


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-wan22-ti2v"])
def test_fused_projections_leave_a_wan_video_unchanged(tmp_path, name):
    """Fusing drops the separate projections, Wan 2.1's image-token ones included, without
    changing what the pipeline makes (a None there would make Wan read image tokens as text)."""
    from batch_runner.replica import speed

    from .conftest import tiny_job

    cfg = run_config("manifest=x", f"model={name}")
    job, images = tiny_job(tmp_path, steps=2)
    job = replace(job, height=cfg.model.height, width=cfg.model.width)
    images = {"image": images["image"].resize((job.width, job.height)), "last_image": None}
    made = []
    for fuse in (False, True):
        pipe = build_pipeline(cfg.model)
        if fuse:
            assert speed.fuse_qkv(pipe.transformer) > 0
        family = anatomy(cfg.model).family
        texts = [job.prompt, job.negative_prompt]
        embeds = dict(zip(texts, family.encode_prompts(pipe, texts, cfg.model, torch.float32), strict=True))
        arguments = family.call_arguments(cfg.model, job, images, embeds)
        with torch.no_grad():
            video = pipe(**arguments, generator=torch.Generator().manual_seed(1), output_type="pt").frames[0]
        made.append(video)
    torch.testing.assert_close(made[1], made[0], rtol=1e-4, atol=1e-4)


def test_choosing_a_models_attention_kernel_leaves_other_models_default_alone():
    """diffusers' set_attention_backend also changes the process-wide default: a kernel chosen for
    one transformer (here cuDNN, which a CPU cannot run) must not reach another pipeline's attention."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from torch.nn.attention import SDPBackend

    before = _AttentionBackendRegistry.get_active_backend()[0]
    pipe = build_pipeline(run_config("manifest=x", "model=tiny-hunyuan15").model)
    family_named("hunyuan15").prefer_attention(pipe.transformer, [SDPBackend.CUDNN_ATTENTION], "_native_cudnn")
    processors = pipe.transformer.attn_processors.values()
    assert {p._attention_backend for p in processors if hasattr(p, "_attention_backend")} == {"_native_cudnn"}
    assert _AttentionBackendRegistry.get_active_backend()[0] == before
