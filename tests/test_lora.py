"""LoRAs fused at start (batch_runner.replica.lora), the fast presets' tiny twins, and guidance 1's single branch."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from batch_runner.config import LoraConfig
from batch_runner.outputs.provenance import output_salt
from batch_runner.replica import lora as loras
from batch_runner.replica.pipeline import build_pipeline
from tests.conftest import (
    frames_of,
    made_by_one_process_and_by_two,
    photo,
    run_cli,
    run_config,
    same_video,
    tiny_job,
    write_manifest,
)

LORA_TWINS = {"tiny-wan-lightx2v": 1, "tiny-wan22-lightning": 2}  # preset -> LoRAs it fuses
DISTILLED_TWINS = ["tiny-ltx-distilled", "tiny-hunyuan15-step-distilled", "tiny-ltx2-distilled"]
FAST_PRESETS = {
    "wan2.1-i2v-14b-480p-lightx2v": "tiny-wan-lightx2v",
    "wan2.1-i2v-14b-720p-lightx2v": "tiny-wan-lightx2v",
    "wan2.2-i2v-a14b-lightning": "tiny-wan22-lightning",
    "ltx-video-13b-0.9.7-distilled": "tiny-ltx-distilled",
    "hunyuanvideo1.5-i2v-480p-step-distilled": "tiny-hunyuan15-step-distilled",
    "ltx-2-distilled": "tiny-ltx2-distilled",
}


@pytest.fixture(autouse=True)
def lora_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tiny:// LoRAs are written into a cache of this test's own (child processes inherit it)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("BATCH_RUNNER_CACHE", str(folder))
    return folder


def model_of(preset: str, *overrides: str):
    return run_config("manifest=x", f"model={preset}", *overrides).model


def rows(tmp_path: Path, count: int = 2) -> Path:
    image = photo(tmp_path / "in.png")
    table = [{"id": f"r{i}", "image": str(image), "prompt": f"a boat {i}", "seed": i} for i in range(count)]
    return write_manifest(tmp_path / "rows.csv", table)


# --- config ---------------------------------------------------------------------------------------


def test_the_command_line_form_of_model_loras_gives_typed_entries():
    model = model_of("tiny-wan", "model.loras=[{path:/x/lora.safetensors,scale:0.8}]")
    assert model.loras == [LoraConfig(path="/x/lora.safetensors", scale=0.8)]
    assert model_of("tiny-wan").loras == []


def test_every_fast_preset_states_its_authors_steps_and_guidance_and_has_a_tiny_twin_of_the_same():
    for preset, twin in FAST_PRESETS.items():
        real, tiny = model_of(preset), model_of(twin)
        assert real.weights == "pretrained" and tiny.weights == "tiny", preset
        assert (real.num_inference_steps, real.guidance_scale) == (tiny.num_inference_steps, tiny.guidance_scale)
        assert real.guidance_scale == 1.0 and real.num_inference_steps <= 8, preset
        assert len(real.loras) == len(tiny.loras) == LORA_TWINS.get(twin, 0), preset
        assert [e.expert for e in real.loras] == [e.expert for e in tiny.loras], preset


# --- fusing ---------------------------------------------------------------------------------------


def unfused_recipe(preset: str, model) -> object:
    """diffusers' own recipe: the same tiny pipeline with the LoRA files loaded as adapters, not fused."""
    pipe = build_pipeline(model_of(preset, "model.loras=[]"))
    for number, lora in enumerate(loras.resolve(model)):
        pipe.load_lora_weights(str(lora.file), adapter_name=f"a{number}", **lora.load_arguments)
    return pipe


def frames(pipe, image) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    call = dict(image=image, prompt="a sea", height=64, width=96, num_frames=9, num_inference_steps=3)
    return pipe(**call, guidance_scale=1.0, generator=generator, output_type="np").frames[0]


@pytest.mark.parametrize("preset", list(LORA_TWINS))
def test_fused_loras_make_the_frames_of_diffusers_unfused_adapters(preset, tmp_path):
    from PIL import Image

    model = model_of(preset)
    fused = build_pipeline(model)
    assert not any("lora" in name for name, _ in fused.transformer.named_modules()), "adapters left behind"
    image = Image.open(photo(tmp_path / "in.png")).convert("RGB").resize((96, 64))
    reference = frames(unfused_recipe(preset, model), image)
    without = frames(build_pipeline(model_of(preset, "model.loras=[]")), image)
    made = frames(fused, image)
    np.testing.assert_allclose(made, reference, atol=1e-4)
    assert np.abs(made - without).max() > 0.05, "the LoRA changed nothing"


def test_a_lora_scale_is_fused_as_diffusers_scales_the_adapter(tmp_path):
    from PIL import Image

    model = model_of("tiny-wan-lightx2v", "model.loras=[{path:'tiny://lightx2v',scale:0.5}]")
    reference = unfused_recipe("tiny-wan-lightx2v", model)
    reference.set_adapters(["a0"], [0.5])
    image = Image.open(photo(tmp_path / "in.png")).convert("RGB").resize((96, 64))
    np.testing.assert_allclose(frames(build_pipeline(model), image), frames(reference, image), atol=1e-4)


def test_an_expert_the_model_lacks_is_refused():
    from batch_runner.errors import UserError

    with pytest.raises(UserError, match="transformer_2"):
        build_pipeline(model_of("tiny-wan", "model.loras=[{path:'tiny://lightx2v',expert:transformer_2}]"))


def test_a_partly_matching_lora_is_reported_with_counts(tmp_path, caplog, lora_cache):
    model = model_of("tiny-wan-lightx2v")
    from batch_runner.families import family_of

    tensors = family_of(model).tiny_lora(model, "lightx2v")
    tensors["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.zeros(4, 24)
    tensors["diffusion_model.blocks.7.self_attn.q.lora_up.weight"] = torch.zeros(24, 4)
    file = tmp_path / "partial.safetensors"
    save_file(tensors, str(file))
    with caplog.at_level(logging.WARNING):
        build_pipeline(replace(model, loras=[LoraConfig(path=str(file))]))
    assert "2 of 50 keys match no layer of transformer" in caplog.text
    assert "blocks.7.attn1.to_q" in caplog.text


def unrelated_lora(folder: Path) -> Path:
    file = folder / "other.safetensors"
    save_file({"unet.down.0.lora_A.weight": torch.ones(4, 8), "unet.down.0.lora_B.weight": torch.ones(8, 4)}, str(file))
    return file


def test_a_lora_for_another_model_is_refused_before_a_saved_models_weights_are_read(tmp_path, monkeypatch):
    from batch_runner.errors import UserError
    from batch_runner.families import family_of

    folder = tmp_path / "saved"
    build_pipeline(model_of("tiny-wan")).save_pretrained(folder)
    lora = f"model.loras=[{{path:{unrelated_lora(tmp_path)}}}]"
    model = model_of("tiny-wan", "model.weights=pretrained", f"model.path={folder}", lora)
    read = []
    monkeypatch.setattr(family_of(model).pipeline_class, "from_pretrained", lambda *a, **k: read.append(1))
    with pytest.raises(UserError, match=r"unet\.down\.0\.lora_A\.weight"):
        build_pipeline(model)
    assert not read


@pytest.mark.parametrize("content", [b"", b"junk", b"\x10\x00\x00\x00\x00\x00\x00\x00{"], ids=["empty", "text", "cut"])
def test_a_file_that_is_not_safetensors_is_refused_naming_the_entry(tmp_path, content):
    from batch_runner.errors import UserError

    file = tmp_path / "lora.safetensors"
    file.write_bytes(content)
    with pytest.raises(UserError, match=r"not a readable safetensors file.*point path at a \.safetensors LoRA") as no:
        build_pipeline(model_of("tiny-wan", f"model.loras=[{{path:{file}}}]"))
    assert str(no.value).startswith(f"model.loras: {str(file)!r} is not a LoRA diffusers can read")


def test_a_scale_that_is_not_finite_is_refused_before_anything_loads():
    from batch_runner.errors import UserError
    from batch_runner.run.checks import check_settings

    cfg = run_config("manifest=x", "model=tiny-wan-lightx2v", "model.loras=[{path:'tiny://lightx2v',scale:nan}]")
    with pytest.raises(UserError, match=r"model.loras entry 1 \('tiny://lightx2v'\) has scale=nan; give a finite"):
        check_settings(cfg)


# --- provenance and the output salt ---------------------------------------------------------------


def test_the_output_salt_follows_a_loras_scale_and_file_contents(tmp_path):
    file = tmp_path / "mine.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 24)}, str(file))
    base = run_config("manifest=x", "model=tiny-wan", f"model.loras=[{{path:{file},scale:1.0}}]")
    salts = {output_salt(base), output_salt(run_config("manifest=x", "model=tiny-wan"))}
    salts.add(output_salt(replace(base, model=replace(base.model, loras=[LoraConfig(str(file), scale=0.5)]))))
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 24)}, str(file))
    salts.add(output_salt(base))
    assert len(salts) == 4


def test_a_loras_digest_is_hashed_once_per_file_version_and_kept_for_later_processes(tmp_path, lora_cache):
    import hashlib

    from batch_runner.replica import lora as lora_module

    file = tmp_path / "mine.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 24)}, str(file))
    assert lora_module.file_sha256(file) == hashlib.sha256(file.read_bytes()).hexdigest()
    (kept,) = (lora_cache / "sha256").iterdir()
    lora_module._cached_sha256.cache_clear()  # as a later process: only the kept digest remains
    kept.write_text("f" * 64)
    assert lora_module.file_sha256(file) == "f" * 64
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 24)}, str(file))  # same size
    assert lora_module.file_sha256(file) == hashlib.sha256(file.read_bytes()).hexdigest()
    assert len(list((lora_cache / "sha256").iterdir())) == 2


# --- guidance 1 -----------------------------------------------------------------------------------


def test_guidance_one_encodes_no_negative_prompt_and_runs_one_branch_per_step(tmp_path):
    from batch_runner.replica.replica import Replica

    replica = Replica(run_config("manifest=x", "model=tiny-wan-lightx2v"), torch.device("cpu"))
    job, images = tiny_job(tmp_path, steps=3)
    job = replace(job, guidance_scale=1.0, negative_prompt="blurry")
    prompts = replica.encode([job])
    assert set(prompts.embeddings) == {job.prompt}
    calls = []
    replica.pipe.transformer.register_forward_hook(lambda module, args, output: calls.append(1))
    replica.make(job, images, prompts)
    assert len(calls) == 3
    stages = replica.stages
    assert set(stages) == {"image_encode_seconds", "denoise_seconds", "decode_seconds"}
    assert all(v >= 0 for v in stages.values()) and stages["denoise_seconds"] > 0
    guided = replace(job, guidance_scale=5.0)
    calls.clear()
    replica.make(guided, images, replica.encode([guided]))
    assert len(calls) == 6, "the guided row's two branches are what guidance 1 saves"


# --- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(LORA_TWINS))
def test_each_tiny_twin_with_a_lora_makes_every_row_with_one_and_two_processes(preset, tmp_path):
    # Lossless: the comparison is of the frames made, not of x264's choices on frames of noise.
    # #23 asks for each twin through the command line with one process and with two: both launched.
    table, _ = made_by_one_process_and_by_two(
        tmp_path, rows(tmp_path), f"model={preset}", "output.crf=0", one_launched=True
    )
    recorded = json.loads(table["loras"].iloc[0])
    assert len(recorded) == LORA_TWINS[preset] and all(len(e["sha256"]) == 64 for e in recorded)


@pytest.mark.parametrize("preset", DISTILLED_TWINS)
def test_each_distilled_tiny_twin_makes_its_rows(preset, tmp_path):
    """In-process, the runner as run.py calls it: the command line adds nothing to what the twin is
    (each family's tiny model runs through it in tests/test_family_contract.py)."""
    from batch_runner.run import runner

    out = tmp_path / "out"
    assert runner.run(run_config(f"manifest={rows(tmp_path)}", f"model={preset}", f"output_dir={out}")) == 0
    assert set(pd.read_parquet(out / "results.parquet")["status"]) == {"ok"}


def test_a_lora_of_unrelated_keys_is_refused_with_exit_2_before_any_row(tmp_path):
    """Through the command line, as #23's done-when tries it: exit 2, the first unmatched keys named."""
    file = unrelated_lora(tmp_path)
    out = tmp_path / "out"
    proc = run_cli(
        f"manifest={rows(tmp_path)}", "model=tiny-wan", f"model.loras=[{{path:{file}}}]", f"output_dir={out}"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "unet.down.0.lora_A.weight" in proc.stderr + proc.stdout
    assert not list(out.glob("videos/*.mp4"))


@pytest.mark.slow  # four runs of the tiny model: in-process (the command line adds nothing here), but not quick
def test_changing_a_loras_scale_remakes_the_rows_and_no_lora_makes_other_frames(tmp_path):
    from batch_runner.run import runner

    manifest, out = rows(tmp_path, 1), tmp_path / "out"
    common = [f"manifest={manifest}", "model=tiny-wan-lightx2v", "output.crf=0"]
    assert runner.run(run_config(*common, f"output_dir={out}")) == 0
    first = frames_of(out / "videos" / "r0.mp4")
    stamp = pd.read_parquet(out / "results.parquet")["finished_at"].iloc[0]
    assert runner.run(run_config(*common, f"output_dir={out}")) == 0  # resumed: nothing to make
    assert pd.read_parquet(out / "results.parquet")["finished_at"].iloc[0] == stamp
    scaled = "model.loras=[{path:'tiny://lightx2v',scale:0.3}]"
    assert runner.run(run_config(*common, scaled, f"output_dir={out}")) == 0
    table = pd.read_parquet(out / "results.parquet")
    assert table["finished_at"].iloc[0] != stamp, "a new scale must remake the row"
    assert json.loads(table["loras"].iloc[0])[0]["scale"] == 0.3
    from batch_runner.outputs.results import STAGE_COLUMNS

    assert table[STAGE_COLUMNS].notna().all(axis=None) and table["denoise_seconds"].iloc[0] > 0
    rescaled = frames_of(out / "videos" / "r0.mp4")
    assert runner.run(run_config(*common, "model.loras=[]", f"output_dir={tmp_path / 'plain'}")) == 0
    plain = frames_of(tmp_path / "plain" / "videos" / "r0.mp4")
    assert not same_video(first, rescaled) and not same_video(first, plain) and not same_video(rescaled, plain)
