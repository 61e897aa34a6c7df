"""from_run=DIR makes each row from the parameters saved with it in DIR, and refuses rows that changed since.

The earlier run's folder is written the way a run writes it (its config.yaml by save_config, one
results line per row by ResultLog from ResultRow.from_job): only the replay is under test here.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from batch_runner.errors import UserError
from batch_runner.inputs.manifest import load_manifest
from batch_runner.outputs.provenance import output_salt, save_config
from batch_runner.outputs.results import ResultLog, ResultRow
from batch_runner.outputs.storage import mark_output_dir
from batch_runner.run.cli import _from_run
from batch_runner.run.replay import replayed
from tests.conftest import photo, run_cli, run_config, write_manifest

SEED = 2**62 + 3  # beyond a float's 53 bits: the saved value must come back exact


def rows(folder: Path) -> list[dict]:
    return [
        {"id": "a", "image": str(photo(folder / "a.png", seed=1)), "prompt": "a boat at dawn", "seed": SEED},
        {"id": "b", "image": str(photo(folder / "b.png", seed=2)), "prompt": "a tree in the wind", "seed": 5},
        {"id": "c", "image": str(photo(folder / "c.png", seed=3)), "prompt": "a city at night", "seed": 6},
    ]


def made_earlier(tmp_path: Path, made: tuple[str, ...] = ("a", "b")) -> tuple[Path, Path]:
    """An earlier run's folder that made rows `made` of a three-row manifest; returns (manifest, folder)."""
    manifest = write_manifest(tmp_path / "jobs.csv", rows(tmp_path / "in"))
    earlier = tmp_path / "earlier"
    cfg = run_config(f"manifest={manifest}", "model=tiny", f"output_dir={earlier}")
    earlier.mkdir()
    mark_output_dir(earlier)
    save_config(cfg, earlier)
    log = ResultLog(earlier, "20260101T000000000000Z", rank=0)
    for job in load_manifest(manifest, cfg.model, cfg.seed).jobs:
        if job.id in made:
            now = datetime.now(timezone.utc).isoformat(timespec="microseconds")  # after the images were written
            row = ResultRow.from_job(job, output_salt(cfg)).but(finished_at=now)
            log.append(row.ok(f"videos/{job.id}.mp4"))
    return manifest, earlier


def replay_config(earlier: Path, *overrides: str):
    return OmegaConf.to_object(_from_run(earlier, list(overrides)))


def replay(earlier: Path, *overrides: str):
    cfg = replay_config(earlier, *overrides)
    return replayed(cfg, load_manifest(cfg.manifest, cfg.model, cfg.seed, cfg.ids))


def test_rows_that_still_match_are_made_from_their_saved_parameters(tmp_path: Path) -> None:
    _, earlier = made_earlier(tmp_path)
    manifest = replay(earlier)
    jobs = {job.id: job for job in manifest.jobs}
    assert sorted(jobs) == ["a", "b", "c"]  # c was never made there: made from the manifest, as a rerun would
    assert jobs["a"].seed == SEED and type(jobs["a"].seed) is int
    assert jobs["a"].prompt == "a boat at dawn" and jobs["b"].num_frames == 9


def test_an_edited_prompt_or_seed_refuses_the_replay_naming_each_row_and_what_changed(tmp_path: Path) -> None:
    manifest, earlier = made_earlier(tmp_path)
    edited = rows(tmp_path / "in")
    edited[0]["seed"] = 7
    edited[1]["prompt"] = "a tree in the snow"
    edited[2]["prompt"] = "c was never made: any prompt goes"
    write_manifest(manifest, edited)
    with pytest.raises(UserError) as refused:
        replay(earlier)
    text = str(refused.value)
    assert "no longer matches how 2 row(s) were made there" in text
    assert f"row 1 (id 'a'), column 'seed': made with {SEED}, the manifest now gives 7" in text
    assert "row 2 (id 'b'), column 'prompt': made with 'a tree in the wind', the manifest now gives" in text
    assert "id 'c'" not in text
    # ids= narrows the replay to rows that still match: it goes on.
    assert [job.id for job in replay(earlier, "ids=[c]").jobs] == ["c"]


def test_an_image_replaced_after_its_row_was_made_refuses_the_replay(tmp_path: Path) -> None:
    _, earlier = made_earlier(tmp_path)
    image = tmp_path / "in" / "b.png"
    photo(image, (60, 40), seed=9)  # another picture under the same name, written now (after the row's record)
    # The kernel stamps a write with its coarse clock, which can read a few milliseconds behind the
    # `finished_at` just recorded: date the new file a second later, as a real replacement would be.
    later = time.time() + 1
    os.utime(image, (later, later))
    with pytest.raises(UserError, match=r"row 2 \(id 'b'\), column 'image': the file .*b\.png' changed after"):
        replay(earlier)


def test_rows_made_under_settings_other_than_the_saved_config_are_refused(tmp_path: Path) -> None:
    _, earlier = made_earlier(tmp_path)
    # A later run into the folder saved another model's settings; rows a and b were made by the first.
    save_config(run_config(f"manifest={tmp_path / 'jobs.csv'}", "model=tiny", "model.max_sequence_length=7"), earlier)
    with pytest.raises(UserError, match=r"row 1 \(id 'a'\): it was made under other settings than"):
        replay(earlier)


def test_a_replay_saves_and_hashes_the_config_of_the_run_it_replays(tmp_path: Path) -> None:
    from batch_runner.outputs.provenance import config_hash

    _, earlier = made_earlier(tmp_path)
    cfg = replay_config(earlier)
    assert cfg.from_run == str(earlier.resolve())
    first = run_config(f"manifest={tmp_path / 'jobs.csv'}", "model=tiny", f"output_dir={earlier}")
    assert config_hash(cfg) == config_hash(first)


def test_from_run_of_an_edited_manifest_exits_2_before_anything_loads(tmp_path: Path) -> None:
    manifest, earlier = made_earlier(tmp_path)
    edited = rows(tmp_path / "in")
    edited[1]["prompt"] = "a tree in the snow"
    write_manifest(manifest, edited)
    again = tmp_path / "again"
    proc = run_cli(f"from_run={earlier}", "ids=[b]", f"output_dir={again}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no longer matches how 1 row(s) were made there" in errors[0], proc.stderr
    assert "row 2 (id 'b'), column 'prompt'" in proc.stderr
    assert not again.exists()
