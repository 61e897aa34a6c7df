"""Settings refused before anything loads: one line naming the setting, its valid values and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from batch_runner.errors import UserError
from batch_runner.run.checks import check_settings
from tests.conftest import ROOT, photo, run_cli, run_config, write_manifest

# override -> words the refusal must hold (besides the setting's name)
BAD_SETTINGS = {
    "output.format=mp4": "videofolder, webdataset",
    "scheduling=random": "dynamic, static",
    "on_invalid=ignore": "fail, skip",
    "speed.compile=yes": "auto, on, off",
    "speed.attention=sage": "auto, flash, cudnn, efficient, math",
    "speed.cache=teacache": "none, first_block, pyramid",
    "memory=none memory.plan=offload": "auto, none, text_offload, expert_offload, group_offload",
    "model.dtype=fp8": "bfloat16, float16, float32",
    "model.weights=hub": "pretrained, random, tiny",
    "model.scheduler=euler": "dpm, ddim, default",
    "log_level=LOUD": "DEBUG, INFO, WARNING",
    "model.num_inference_steps=0": "integer from 1 to 1000",
    "model.fps=0": "number from 0.1 to 240",
    "model.num_frames=-9": "integer from 1 to 10000",
    "memory.budget_gib=-1": "number of at least 0.01",
    "memory.host_budget_gib=0": "number of at least 0.01",
    "chunk_size=0": "integer of at least 1",
    "output.shard_size=0": "integer of at least 1",
    "output.crf=60": "integer from 0 to 51",
    "max_image_pixels=0": "integer of at least 1",
    "model.path=/models/CogVideoX-5b-I2V": "is not read by tiny-cogvideox, whose weights are built in code; drop",
    "ids=[]": "selects no row; name the rows to make (ids=[a,b]), or leave ids out",
}


@pytest.mark.parametrize("override", list(BAD_SETTINGS))
def test_each_bad_setting_is_one_line_naming_it_and_the_valid_values(override: str) -> None:
    cfg = run_config("manifest=unused.csv", "model=tiny", *override.split())
    key = override.split()[-1].split("=")[0]
    with pytest.raises(UserError) as caught:
        check_settings(cfg)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{key}=")
    assert BAD_SETTINGS[override] in message
    assert message.endswith("nothing was loaded or written.")


def test_the_defaults_of_every_model_pass() -> None:
    for model in sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")):
        check_settings(run_config("manifest=unused.csv", f"model={model}"))
    check_settings(run_config("manifest=unused.csv", "memory.budget_gib=8", "speed.cache=pyramid", "log_level=debug"))


@pytest.mark.parametrize(
    ("overrides", "sentence"),
    [
        (("model.num_frames=10",), "model.num_frames: tiny-cogvideox makes 8N+1 frames, 9 to 49, not 10; the nearest"),
        (("model.height=33",), "model.height/model.width: tiny-cogvideox cannot make 96x33 (width x height)"),
        (("model=tiny-ltx2", "model.num_inference_steps=1"), "model.num_inference_steps: tiny-ltx2 runs at least 2"),
    ],
)
def test_a_row_setting_the_model_cannot_make_is_named_as_the_setting_not_as_every_rows_fault(
    overrides: tuple[str, ...], sentence: str
) -> None:
    with pytest.raises(UserError) as caught:
        check_settings(run_config("manifest=unused.csv", "model=tiny", *overrides))
    assert str(caught.value).startswith(sentence), caught.value
    assert "(the default of each row that gives none)" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("key", ["manifest", "output_dir"])
def test_an_empty_path_is_refused_not_taken_for_the_default(key: str) -> None:
    """`output_dir=$OUT` with OUT unset made the run write under ./outputs/ instead."""
    cfg = run_config("manifest=unused.csv", "model=tiny", f"{key}=")
    with pytest.raises(UserError, match=rf"^{key}= is empty \(an unset shell variable\?\); give "):
        check_settings(cfg)


def test_several_bad_settings_are_named_together_on_one_line() -> None:
    cfg = run_config("manifest=unused.csv", "model.fps=0", "scheduling=x")
    with pytest.raises(UserError, match=r"^scheduling='x' .*; model.fps=0.0 is out of range"):
        check_settings(cfg)


def test_the_command_line_refuses_before_reading_the_manifest_or_loading(tmp_path: Path) -> None:
    # Before these checks, steps=0 failed every row with ZeroDivisionError and exited 0, and
    # output.format was refused only after every video was made.
    manifest = write_manifest(tmp_path / "jobs.csv", [{"image": str(photo(tmp_path / "a.png")), "prompt": "x"}])
    out = tmp_path / "out"
    override = "model.num_inference_steps=0"
    settings = (f"manifest={manifest}", "model=tiny", f"output_dir={out}", override, "output.format=mp4")
    proc = run_cli(*settings, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and override in errors[0] and "output.format='mp4'" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
