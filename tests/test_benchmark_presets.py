"""scripts/benchmark.py --model <fast preset>: random LoRAs in the published format, the card's unfused recipe.

The benchmark itself needs a GPU (the lead runs it); what it builds runs here on the tiny twins.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from batch_runner.families import family_of
from batch_runner.replica import lora as loras
from batch_runner.replica.pipeline import build_pipeline
from tests.conftest import ROOT, photo, run_config

LORA_PRESETS = {  # preset -> its tiny twin, (key format, rank) of each published LoRA
    "wan2.1-i2v-14b-480p-lightx2v": ("tiny-wan-lightx2v", [("lora_down", 64)]),
    "wan2.1-i2v-14b-720p-lightx2v": ("tiny-wan-lightx2v", [("lora_down", 64)]),
    "wan2.2-i2v-a14b-lightning": ("tiny-wan22-lightning", [("lora_A", 64), ("lora_A", 64)]),
}


@pytest.fixture(autouse=True)
def lora_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_RUNNER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bench():
    if str(ROOT / "scripts") not in sys.path:  # as running the script puts its folder first (bench_report)
        sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_script"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def model_of(preset: str, *overrides: str):
    return run_config("manifest=x", f"model={preset}", *overrides).model


@pytest.mark.parametrize("preset", list(LORA_PRESETS))
def test_a_stand_in_lora_has_the_published_keys_and_rank_and_names_only_layers_of_its_expert(preset):
    """Drawn for the tiny twin's transformer (the full-size one has the same layer names; drawing
    its 360M values is the GPU run's job), in the format and rank the preset's file names."""
    real = model_of(preset)
    twin_name, published = LORA_PRESETS[preset]
    twin = model_of(twin_name)
    family = family_of(twin)
    pipe = family.tiny(replace(twin, loras=[]))
    for entry, (down, rank) in zip(real.loras, published, strict=True):
        component, _ = family.lora_target(real, entry.expert)
        tensors = family.published_lora(twin, entry, getattr(pipe, component))
        downs = {k: v for k, v in tensors.items() if f".{down}." in k}
        assert downs and all(v.shape[0] == rank for v in downs.values()), preset
        assert all(k.startswith("diffusion_model.blocks.") for k in tensors)
        state = family.pipeline_class.lora_state_dict(tensors)
        prefix = "transformer"
        layers = {loras.layer_of(k, prefix) for k in state}
        assert layers <= {name for name, _ in getattr(pipe, component).named_modules()}, preset


@pytest.mark.parametrize("twin", ["tiny-wan-lightx2v", "tiny-wan22-lightning"])
def test_the_benchmarks_fused_random_loras_make_the_frames_of_the_cards_unfused_recipe(bench, twin, tmp_path):
    """Ours: random_loras' files fused by build_pipeline. The reference: the plain pipeline with
    load_adapters (load_lora_weights, unfused). Same frames in float32; different without the LoRAs."""
    from PIL import Image

    model = bench.random_loras(model_of(twin), tmp_path / "loras")
    assert all(Path(e.path).parent == tmp_path / "loras" and e.weight_name is None for e in model.loras)
    image = Image.open(photo(tmp_path / "in.png")).convert("RGB").resize((96, 64))

    def frames(pipe) -> np.ndarray:
        call = dict(image=image, prompt="a sea", height=64, width=96, num_frames=9, num_inference_steps=2)
        return pipe(**call, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]

    fused = frames(build_pipeline(model))
    card = build_pipeline(replace(model, loras=[]))
    assert bench.load_adapters(card, model) == [f"lora_{i}" for i in range(len(model.loras))]
    np.testing.assert_allclose(fused, frames(card), atol=1e-4)
    assert np.abs(fused - frames(build_pipeline(replace(model, loras=[])))).max() > 1e-3, "the LoRAs changed nothing"


def test_the_end_to_end_command_carries_the_random_loras_as_the_command_line_writes_them(bench, tmp_path):
    model = bench.random_loras(model_of("tiny-wan22-lightning"), tmp_path)
    overrides = bench.lora_overrides(model)
    assert run_config("manifest=x", "model=tiny-wan22-lightning", *overrides).model.loras == model.loras
    assert bench.lora_overrides(model_of("tiny-wan")) == []


@pytest.mark.slow
def test_the_end_to_end_part_runs_the_command_line_on_a_preset_with_its_loras_and_options(bench, tmp_path, monkeypatch):
    """The part the GPU run could not measure twice: photos given as a relative folder (the manifest
    lives in a temporary folder) and the preset's options as --option set them, nothing more."""
    for i in range(2):
        photo(tmp_path / "photos" / f"p{i}.png", seed=i)
    monkeypatch.chdir(tmp_path)
    target = bench.Target.of("tiny-wan22-lightning", tmp_path / "loras", options={"guidance_scale_2": 1.0})
    record = bench.end_to_end(3, 2, tmp_path / "out", Path("photos"), target)
    assert record["ok_rows"] == 3 and record["rows"] == 3
    assert "model.options.guidance_scale_2=1.0" in record["command"]
    assert "model.options.boundary_ratio" not in record["command"], "only the options --option set"
    assert record["median_stage_seconds"]["denoise_seconds"] > 0
    startups = (record["startup_seconds"], record["warm_startup_seconds"], record["warm_server_startup_seconds"])
    for startup in startups:  # launch to each phase's end; the last forked by the warm server, or it raised
        assert 0 < startup["imports"] < startup["replica"] < startup["first_step"] < startup["first_video"]
    # The server's own account of what it imported ahead: a module left to each run says why.
    notes = record["warm_server_notes"]
    assert notes[-1].startswith("ready at") and all(" not imported ahead: " in note for note in notes[:-1])


def test_the_allocators_calls_are_counted_between_two_readings(bench):
    before = {"num_device_alloc": 10, "num_device_free": 4, "num_alloc_retries": 0, "num_sync_all_streams": 1}
    after = {"num_device_alloc": 250, "num_device_free": 244, "num_alloc_retries": 2, "num_sync_all_streams": 3}
    assert bench.allocator_calls(before, after) == {
        "cuda_malloc": 240,
        "cuda_free": 240,
        "alloc_retries": 2,
        "sync_all_streams": 2,
    }
    assert bench.allocator_calls({}, {}) == dict.fromkeys(bench.ALLOCATOR_COUNTERS, 0)  # a torch without them
