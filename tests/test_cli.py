"""End to end through the real command line: `python run.py ...` and `accelerate launch --cpu ...`.

Every run here is a subprocess with the tiny model, on real images of assorted modes and formats.
Runs that later runs compare against use `output.crf=0` (lossless H.264): the decoded frames are then
exactly the frames the pipeline made, so "same frames" can be asserted bit for bit. That the default
lossy encoding gives the same bytes on a rerun and a `from_run` regeneration is tested on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from batch_runner.inputs.ids import derive_seed
from batch_runner.outputs.results import PROVENANCE_COLUMNS, RESULT_COLUMNS
from batch_runner.outputs.video import read_video
from batch_runner.run import runner, startup
from tests.conftest import (
    ROOT,
    accelerate_cpu,
    assert_both_ranks_took_part,
    assorted_photos,
    frames_of,
    ok,
    run_cli,
    run_config,
    write_manifest,
)

LOSSLESS = "output.crf=0"
# The columns every results table starts with, in this order (the list).
REQUIRED = [
    "id",
    "status",
    "video_path",
    "seed",
    "num_frames",
    "height",
    "width",
    "fps",
    "num_inference_steps",
    "guidance_scale",
    "rank",
    "seconds",
    "peak_memory_gib",
    "error",
]
# id -> (image file, num_frames or None for the model's default, seed or None, category, prompt)
ROWS = {
    "rgb": ("rgb.png", 9, 11, "street", "the sea at night"),
    "gray": ("gray.jpg", 17, None, "portrait", "a car in the city"),
    "rgba": ("rgba.png", 25, 7, "logo", "the sea at night"),
    "webp": ("wide.webp", 9, None, "landscape", "light on the water"),
    "jpeg": ("photo.jpeg", None, 123456789012, "street", "a tree by the sea"),
    "palette": ("pal.png", 17, None, "icon", "the sky at night"),
}
EXPECTED_FRAMES = {row_id: frames or 9 for row_id, (_, frames, _, _, _) in ROWS.items()}  # tiny: 9 by default
TINY = {"height": 64, "width": 96, "fps": 8.0, "num_inference_steps": 4, "guidance_scale": 6.0}


# --- helpers --------------------------------------------------------------------------------------


def video_state(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((out / "videos").glob("*.mp4"))}


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def part_ids(part: Path) -> list[str]:
    return [json.loads(line)["id"] for line in part.read_text().splitlines() if line.strip()]


def hydra_leftovers(folder: Path) -> list[Path]:
    hydra = [p for p in folder.rglob("*") if p.name in (".hydra", "multirun") or p.name.endswith(".log")]
    return [p for p in hydra if p.parent != folder / "logs"]  # logs/: the non-main ranks' own logs


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- shared runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A manifest folder: the CSV next to an images/ folder it names relatively."""
    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    made = {path.name: path for path in assorted_photos(images).values()}
    assert {name: p.exists() for name, p in made.items()} == dict.fromkeys(made, True)
    rows = [
        {
            "id": row_id,
            "image": f"images/{image}",
            "prompt": prompt,
            "num_frames": frames,
            "seed": seed,
            "category": category,
        }
        for row_id, (image, frames, seed, category, prompt) in ROWS.items()
    ]
    manifest = write_manifest(root / "cli_e2e_jobs.csv", rows)
    return {"root": root, "manifest": manifest, "rows": rows}


@pytest.fixture(scope="module")
def two_process(data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The issue's acceptance run: accelerate launch --cpu --num_processes 2, from an unrelated cwd."""
    cwd = tmp_path_factory.mktemp("cwd_two")
    out = tmp_path_factory.mktemp("two") / "out"
    started = time.time()
    proc = run_cli(
        f"manifest={data['manifest']}",
        "model=tiny",
        f"output_dir={out}",
        LOSSLESS,
        cwd=cwd,
        launcher=accelerate_cpu(2),
    )
    ok(proc)
    return {"out": out, "cwd": cwd, "proc": proc, "videos": video_state(out), "between": (started, time.time())}


@pytest.fixture(scope="module")
def one_process(data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every row made by one process: this one, the runner as run.py calls it (`python run.py` itself
    runs below: the resume, the parquet manifest, the reruns)."""
    out = tmp_path_factory.mktemp("one") / "out"
    assert runner.run(run_config(f"manifest={data['manifest']}", "model=tiny", f"output_dir={out}", LOSSLESS)) == 0
    return out


# --- acceptance -----------------------------------------------------------------------------------


def test_two_processes_make_every_video_with_the_asked_frames(two_process: dict) -> None:
    out = two_process["out"]
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(f"{i}.mp4" for i in ROWS)
    for row_id, frames in EXPECTED_FRAMES.items():
        video, fps = read_video(out / "videos" / f"{row_id}.mp4")
        assert video.shape == (frames, TINY["height"], TINY["width"], 3), row_id
        assert video.dtype == np.uint8
        assert fps == pytest.approx(TINY["fps"])
        # Real content, not a constant frame.
        assert video.std() > 1.0, row_id
    for name in ("results.parquet", "metadata.parquet", "report.json", "report.html", "config.yaml"):
        assert (out / name).is_file(), name
    assert "6 of 6 rows ok" in two_process["proc"].stdout


def test_two_processes_results_are_all_ok_from_both_ranks(two_process: dict) -> None:
    out = two_process["out"]
    table = pd.read_parquet(out / "results.parquet")
    assert list(table["id"]) == list(ROWS)  # manifest order
    assert set(table["status"]) == {"ok"}
    assert table["error"].isna().all()
    assert_both_ranks_took_part(out, set(table["rank"]))
    assert dict(zip(table["id"], table["category"], strict=True)) == {i: r[3] for i, r in ROWS.items()}
    assert dict(zip(table["id"], table["num_frames"], strict=True)) == EXPECTED_FRAMES
    parts = sorted(p.name for p in (out / "parts").glob("*.jsonl"))
    assert [p.split(".")[-2] for p in parts] == ["rank00000", "rank00001"]
    summary = report(out)
    assert (summary["rows"], summary["ok"], summary["failed"], summary["made_this_run"]) == (6, 6, 0, 6)
    metadata = pd.read_parquet(out / "metadata.parquet")
    assert sorted(metadata["file_name"]) == sorted(f"videos/{i}.mp4" for i in ROWS)
    assert "category" in metadata.columns


def test_only_the_main_process_logs_below_warnings_to_the_terminal(two_process: dict) -> None:
    """Other ranks' lines would break the main process's progress bar; their full log is a file."""
    stderr = two_process["proc"].stderr
    assert "[rank 0/2] INFO" in stderr
    assert "[rank 1/2] INFO" not in stderr
    rank1 = (two_process["out"] / "logs" / "rank00001.log").read_text()
    assert "[rank 1/2] INFO batch_runner.run.runner: row " in rank1
    assert not (two_process["out"] / "logs" / "rank00000.log").exists()  # the main one has the terminal


def test_each_process_records_where_its_start_up_went(two_process: dict) -> None:
    """Launch-to-first-step is measured per process (scripts/scaling.py reads these files)."""
    start_ups = sorted((two_process["out"] / "logs").glob("startup-rank*.json"))
    assert [p.name for p in start_ups] == ["startup-rank00000.json", "startup-rank00001.json"]
    for rank, path in enumerate(start_ups):
        marks = json.loads(path.read_text())
        assert marks["rank"] == rank
        times = [marks[k] for k in ("process_start", *startup.PHASES)]
        assert times == sorted(times), marks  # the phases end in order
        started, ended = two_process["between"]
        # Wall-clock times of this run, however long it took (the process start comes from /proc, whose
        # boot time has one-second resolution).
        assert started - 2 <= times[0] and times[-1] <= ended
        # The replica phase split by its owner: every part, in seconds, together within the phase.
        parts = marks["replica_parts"]
        assert list(parts) == [
            "family_imports",
            "plan",
            "weights",
            "prepare",
            "host_sharing",
            "compile",
            "placement",
        ], parts
        assert all(s >= 0 for s in parts.values()) and sum(parts.values()) <= marks["replica"] - marks["process_group"]
    assert "start-up: first video" in two_process["proc"].stderr
    assert "replica " in two_process["proc"].stderr and "(family_imports " in two_process["proc"].stderr


def test_readme_launch_commands_leave_accelerate_no_defaults_to_warn_about(monkeypatch, caplog) -> None:
    """`accelerate launch` warns about every launch setting left to its defaults; the README's
    commands pass them all, so that users copying them see no warning."""
    import shlex

    import accelerate.commands.launch as launch
    import psutil

    monkeypatch.setattr(launch, "default_config_file", "/nonexistent/default_config.yaml")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # as for most users: --cpu must set threads itself
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 64)
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    launchers = ("accelerate launch", "python -m accelerate.commands.launch")  # the CLI, or its module
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith(launchers)]
    assert len(commands) >= 4 and any(c.startswith(launchers[1]) for c in commands)
    for command in commands:
        words = shlex.split(command.replace("$RANK", "0").replace("$HEAD", "10.0.0.1"))
        flags = words[2:] if words[0] == "accelerate" else words[3:]
        args = launch.launch_command_parser().parse_args(flags)
        caplog.clear()
        launch._validate_launch_command(args)
        assert "had defaults used instead" not in caplog.text, command
        if not args.cpu and args.num_processes > 1:  # accelerate switches this on itself, with a warning
            assert args.multi_gpu, command


def test_two_process_run_writes_nothing_in_the_cwd_or_the_repo(two_process: dict) -> None:
    assert list(two_process["cwd"].iterdir()) == []
    assert hydra_leftovers(two_process["out"]) == []
    assert not (ROOT / ".hydra").exists()
    assert not (ROOT / "outputs" / "cli_e2e_jobs").exists()


def test_second_identical_run_generates_and_rewrites_nothing(two_process: dict, data: dict) -> None:
    out = two_process["out"]
    before = video_state(out)
    assert before == two_process["videos"]
    parts_before = sorted((out / "parts").iterdir())
    proc = run_cli(
        f"manifest={data['manifest']}",
        "model=tiny",
        f"output_dir={out}",
        LOSSLESS,
        cwd=two_process["cwd"],
        launcher=accelerate_cpu(2),
    )
    ok(proc)
    assert video_state(out) == before  # same bytes, same mtime_ns: not even rewritten
    assert sorted((out / "parts").iterdir()) == parts_before
    summary = report(out)
    assert (summary["ok"], summary["made_this_run"]) == (6, 0)
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["status"]) == {"ok"} and len(table) == 6


def test_one_process_makes_the_same_frames_as_two(two_process: dict, one_process: Path) -> None:
    """A row's video depends on its seed, never on how many processes shared the run."""
    for row_id in ROWS:
        two = frames_of(two_process["out"] / "videos" / f"{row_id}.mp4")
        one = frames_of(one_process / "videos" / f"{row_id}.mp4")
        assert one.shape == two.shape
        assert np.array_equal(one, two), f"{row_id}: max diff {np.abs(one.astype(int) - two).max()}"
    table = pd.read_parquet(one_process / "results.parquet")
    assert set(table["rank"]) == {0}
    # Different rows really are different videos (the comparison above can fail).
    assert not np.array_equal(frames_of(one_process / "videos/rgb.mp4"), frames_of(one_process / "videos/webp.mp4"))


# --- results table --------------------------------------------------------------------------------


def test_results_schema(two_process: dict) -> None:
    path = two_process["out"] / "results.parquet"
    table = pd.read_parquet(path)
    assert list(table.columns[: len(REQUIRED)]) == REQUIRED
    assert list(table.columns) == RESULT_COLUMNS + PROVENANCE_COLUMNS + ["category"]
    for column in ("id", "status", "video_path", "category"):
        assert pd.api.types.is_string_dtype(table[column]), column
    for column in ("seed", "num_frames", "height", "width", "num_inference_steps", "rank"):
        assert pd.api.types.is_integer_dtype(table[column]), column
    for column in ("fps", "guidance_scale", "seconds", "peak_memory_gib"):
        assert pd.api.types.is_float_dtype(table[column]), column
    schema = pq.read_schema(path)
    assert str(schema.field("seed").type) == "int64"
    assert str(schema.field("num_frames").type) == "int64"
    assert str(schema.field("seconds").type) == "double"

    by_id = table.set_index("id")
    for row_id, (_, _, seed, _, prompt) in ROWS.items():
        row = by_id.loc[row_id]
        assert row["video_path"] == f"videos/{row_id}.mp4"  # relative to output_dir
        assert (two_process["out"] / row["video_path"]).is_file()
        assert row["seed"] == (seed if seed is not None else derive_seed(0, row_id))
        assert row["prompt"] == prompt
        assert (row["height"], row["width"], row["fps"]) == (TINY["height"], TINY["width"], TINY["fps"])
        assert (row["num_inference_steps"], row["guidance_scale"]) == (4, 6.0)
        assert row["seconds"] > 0
    assert table["peak_memory_gib"].isna().all()  # no GPU
    assert set(table["gpu"]) == {"cpu"}
    assert set(table["model"]) == {"tiny-cogvideox"}  # model=tiny composes tiny-cogvideox
    assert table["config_hash"].nunique() == 1


# --- resume ---------------------------------------------------------------------------------------


def test_resume_makes_only_missing_rows_and_overwrite_redoes_all(one_process: Path, data: dict, tmp_path: Path) -> None:
    out = tmp_path / "resume"
    shutil.copytree(one_process, out)
    original_rgba = frames_of(out / "videos/rgba.mp4")
    # One video deleted, one row's record deleted (its video stays).
    (out / "videos/rgba.mp4").unlink()
    (part,) = (out / "parts").glob("*.jsonl")
    lines = part.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["id"] != "jpeg"]
    assert len(kept) == len(lines) - 1
    part.write_text("".join(kept))
    untouched = {k: v for k, v in video_state(out).items() if k != "jpeg.mp4"}

    ok(run_cli(f"manifest={data['manifest']}", "model=tiny", f"output_dir={out}", LOSSLESS, cwd=tmp_path))
    new_parts = [p for p in (out / "parts").glob("*.jsonl") if p != part]
    assert sorted(i for p in new_parts for i in part_ids(p)) == ["jpeg", "rgba"]
    assert report(out)["made_this_run"] == 2
    after = video_state(out)
    assert {k: v for k, v in after.items() if k in untouched} == untouched
    assert np.array_equal(frames_of(out / "videos/rgba.mp4"), original_rgba)
    table = pd.read_parquet(out / "results.parquet")
    assert list(table["id"]) == list(ROWS) and set(table["status"]) == {"ok"}

    # In-process, the runner as run.py calls it: the command line's resume is the run above.
    assert (
        runner.run(
            run_config(f"manifest={data['manifest']}", "model=tiny", f"output_dir={out}", LOSSLESS, "overwrite=true")
        )
        == 0
    )
    assert report(out)["made_this_run"] == 6
    redone = video_state(out)
    assert sorted(redone) == sorted(after)
    assert all(redone[name][0] != after[name][0] for name in after), "overwrite=true left a video in place"
    newest = max((out / "parts").glob("*.jsonl"), key=lambda p: p.name)
    assert sorted(part_ids(newest)) == sorted(ROWS)


# --- paths ----------------------------------------------------------------------------------------


def test_parquet_manifest_relative_paths_and_clean_cwd(data: dict, one_process: Path, tmp_path: Path) -> None:
    """Image paths resolve against the manifest's folder, output_dir against the user's cwd."""
    rows = [r for r in data["rows"] if r["id"] in ("gray", "palette")]
    manifest = write_manifest(data["root"] / "cli_e2e_subset.parquet", rows)
    assert pd.read_parquet(manifest)["image"].tolist() == ["images/gray.jpg", "images/pal.png"]
    cwd = tmp_path / "work"
    cwd.mkdir()
    data_before = sorted(p.name for p in data["root"].iterdir())

    ok(run_cli(f"manifest={manifest}", "model=tiny", "output_dir=rel/out", LOSSLESS, cwd=cwd))
    out = cwd / "rel" / "out"
    assert [p.name for p in cwd.iterdir()] == ["rel"]
    assert [p.name for p in (cwd / "rel").iterdir()] == ["out"]
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["gray.mp4", "palette.mp4"]
    assert sorted(p.name for p in data["root"].iterdir()) == data_before  # nothing next to the manifest
    assert hydra_leftovers(cwd) == []
    assert not (ROOT / ".hydra").exists()
    assert not (ROOT / "outputs" / "cli_e2e_subset").exists()
    assert not (ROOT / "rel").exists()
    table = pd.read_parquet(out / "results.parquet")
    assert list(table["video_path"]) == ["videos/gray.mp4", "videos/palette.mp4"]
    assert list(table["category"]) == ["portrait", "icon"]
    # Same ids and parameters as the CSV rows: the same videos.
    for row_id in ("gray", "palette"):
        assert np.array_equal(frames_of(out / f"videos/{row_id}.mp4"), frames_of(one_process / f"videos/{row_id}.mp4"))


# --- model loading --------------------------------------------------------------------------------


def test_saved_tiny_pipeline_loads_through_model_path_and_makes_the_same_videos(
    data: dict, one_process: Path, tmp_path: Path
) -> None:
    from batch_runner.replica.pipeline import build_pipeline

    folder = tmp_path / "tiny-saved"
    build_pipeline(run_config("manifest=x", "model=tiny").model).save_pretrained(folder)
    assert (folder / "model_index.json").is_file()
    out = tmp_path / "out"
    # In-process, the runner as run.py calls it (one process loading the folder itself, nothing shared);
    # the command line loads a saved folder in the two-process test below.
    overrides = ("model=tiny", "model.weights=pretrained", f"model.path={folder}", "ids=[rgba,webp]", LOSSLESS)
    repo = "model.repo=someone/tiny-cogvideox"  # what a local copy was downloaded from
    assert runner.run(run_config(f"manifest={data['manifest']}", *overrides, repo, f"output_dir={out}")) == 0
    table = pd.read_parquet(out / "results.parquet")
    assert list(table["id"]) == ["rgba", "webp"] and set(table["status"]) == {"ok"}
    assert set(table["model_path"]) == {str(folder)} and set(table["model_repo"]) == {"someone/tiny-cogvideox"}
    for row_id in ("rgba", "webp"):
        assert np.array_equal(frames_of(out / f"videos/{row_id}.mp4"), frames_of(one_process / f"videos/{row_id}.mp4"))


def test_two_processes_load_a_saved_pipeline_once_and_share_it(data: dict, one_process: Path, tmp_path: Path) -> None:
    """Rank 0 reads the folder; rank 1 builds the components empty and maps rank 0's copy."""
    from batch_runner.replica.pipeline import build_pipeline

    folder = tmp_path / "tiny-saved"
    build_pipeline(run_config("manifest=x", "model=tiny").model).save_pretrained(folder)
    out = tmp_path / "out"
    proc = run_cli(
        f"manifest={data['manifest']}",
        "model=tiny",
        "model.weights=pretrained",
        f"model.path={folder}",
        "ids=[rgba,webp,gray]",
        "scheduling=static",  # both ranks make rows however the machine schedules them (checked below)
        f"output_dir={out}",
        LOSSLESS,
        cwd=tmp_path,
        launcher=accelerate_cpu(2),
    )
    ok(proc)
    rank1 = (out / "logs" / "rank00001.log").read_text()  # not on the terminal: the main process owns it
    for name in ("text_encoder", "transformer", "vae"):
        assert f"[rank 0/2] INFO batch_runner.replica.host_weights: shared {name} on this host" in proc.stderr
        assert f"[rank 1/2] INFO batch_runner.replica.host_weights: mapped {name} from the copy process" in rank1
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["status"]) == {"ok"} and sorted(set(table["rank"])) == [0, 1]
    for row_id in ("rgba", "webp", "gray"):
        assert np.array_equal(frames_of(out / f"videos/{row_id}.mp4"), frames_of(one_process / f"videos/{row_id}.mp4"))


def test_two_processes_without_sharing_load_their_own_copies(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli(
        f"manifest={data['manifest']}",
        "model=tiny",
        "memory.share_host_weights=false",
        "ids=[rgba,webp]",
        f"output_dir={out}",
        cwd=tmp_path,
        launcher=accelerate_cpu(2),
    )
    ok(proc)
    assert "batch_runner.replica.host_weights" not in proc.stderr
    assert set(pd.read_parquet(out / "results.parquet")["status"]) == {"ok"}


def test_a_missing_model_folder_is_one_sentence_naming_model_path() -> None:
    """In-process: the refusal's text (its way to exit 2 on the command line is tested below, once)."""
    from batch_runner.errors import UserError
    from batch_runner.replica.pipeline import build_pipeline

    model = run_config("manifest=x", "model=tiny", "model.weights=pretrained", "model.path=/nonexistent").model
    with pytest.raises(UserError) as refused:
        build_pipeline(model)
    line = str(refused.value)
    assert "\n" not in line and "model.path" in line and "/nonexistent" in line
    assert line.rstrip().endswith((".", ")"))


def test_an_incomplete_model_folder_is_told_which_repository_to_download_into_it(tmp_path: Path) -> None:
    """A folder without the pipeline's files: the sentence names the model's own repository (the
    config's `repo`, which `path` is unless overridden), not a placeholder."""
    from batch_runner.errors import UserError
    from batch_runner.replica.pipeline import build_pipeline

    assert run_config("manifest=x", "model=cogvideox-5b-i2v").model.path == "THUDM/CogVideoX-5b-I2V"
    model = run_config("manifest=x", "model=cogvideox-5b-i2v", f"model.path={tmp_path}").model
    with pytest.raises(UserError) as refused:
        build_pipeline(model)
    line = str(refused.value)
    assert "\n" not in line
    assert f"hf download THUDM/CogVideoX-5b-I2V --local-dir {tmp_path}`" in line


def test_a_model_section_saved_before_repo_gets_it_from_a_path_that_names_no_folder(tmp_path: Path) -> None:
    """A resumed folder of an earlier version: its repository is known again where its path was it."""
    from batch_runner.families import upgrade_saved_model

    hub = upgrade_saved_model({"name": "ltx-2", "family": "ltx2", "path": "Lightricks/LTX-2"})
    assert hub["repo"] == "Lightricks/LTX-2"
    local = upgrade_saved_model({"name": "ltx-2", "family": "ltx2", "path": str(tmp_path)})
    assert "repo" not in local
    kept = upgrade_saved_model({"name": "ltx-2", "family": "ltx2", "path": str(tmp_path), "repo": "Lightricks/LTX-2"})
    assert kept["repo"] == "Lightricks/LTX-2"


def test_missing_model_is_one_sentence_and_exit_2(data: dict, tmp_path: Path) -> None:
    path = "nobody-here/no-such-model"  # offline, as a cluster node is: not a folder, and no Hub
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    proc = run_cli(
        f"manifest={data['manifest']}",
        "model=tiny",
        "model.weights=pretrained",
        f"model.path={path}",
        f"output_dir={out}",
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "model.path" in line and path in line
    assert line.rstrip().endswith((".", ")"))
    assert not out.exists() or not list((out / "videos").glob("*.mp4"))


# --- provenance -----------------------------------------------------------------------------------


def test_a_rerun_and_a_from_run_regeneration_write_byte_identical_videos(data: dict, tmp_path: Path) -> None:
    """Same frames, same bytes (default lossy crf): a dataset's content hashes and dedup rely on it.

    The rerun is pinned to one CPU, as a rank of a multi-process run may be: the encoder's output
    must not follow the CPUs a process sees. (At the tiny model's 64x96 x264 keeps to one thread
    anyway; tests/test_video.py shows the difference at a larger size.) The regeneration picks one
    row of the earlier run and runs from another cwd, which it leaves empty.
    """
    first, rerun, again = tmp_path / "first", tmp_path / "rerun", tmp_path / "again"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    common = (f"manifest={data['manifest']}", "model=tiny")
    # The first run in-process (the runner as run.py calls it): the rerun and the regeneration are processes.
    assert runner.run(run_config(*common, "ids=[webp,gray]", f"output_dir={first}")) == 0
    one_cpu = min(os.sched_getaffinity(0))
    taskset = ["taskset", "-c", str(one_cpu), sys.executable]
    ok(run_cli(*common, "ids=[webp]", f"output_dir={rerun}", cwd=tmp_path, launcher=taskset))
    ok(run_cli(f"from_run={first}", "ids=[webp]", f"output_dir={again}", cwd=elsewhere))
    made = (first / "videos/webp.mp4").read_bytes()
    assert (rerun / "videos/webp.mp4").read_bytes() == made
    assert (again / "videos/webp.mp4").read_bytes() == made
    assert [p.name for p in (again / "videos").iterdir()] == ["webp.mp4"]
    table = pd.read_parquet(again / "results.parquet")
    assert list(table["id"]) == ["webp"] and list(table["status"]) == ["ok"]
    assert list(table["category"]) == ["landscape"]
    assert list(elsewhere.iterdir()) == []


def test_from_run_with_a_group_choice_composes_that_group(tmp_path: Path) -> None:
    """`from_run=DIR model=...` once failed with "Bad setting a setting: Merge error"."""
    from batch_runner.outputs.provenance import save_config
    from batch_runner.outputs.storage import mark_output_dir
    from tests.conftest import run_config

    earlier = tmp_path / "earlier"  # an earlier run's folder: its marker and its config
    save_config(run_config(f"manifest={ROOT / 'examples/jobs.csv'}", "model=tiny", "memory=group_offload"), earlier)
    mark_output_dir(earlier)
    proc = run_cli(f"from_run={earlier}", "model=tiny", "memory=none", "dry_run=true", cwd=tmp_path)
    ok(proc)
    assert "dry run: no model loaded, nothing written." in proc.stdout


# --- configuration errors -------------------------------------------------------------------------


def test_misspelt_key_fails_clearly_before_anything_runs(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli(f"manifest={data['manifest']}", "model=tiny", "modle.dtype=x", f"output_dir={out}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "modle" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "sentence"),
    [
        (
            "memroy=none",
            "There is no setting 'memroy' among the settings (batch_runner/config.py); did you mean memory?",
        ),
        ("model=wan", "model=wan is not one of the model choices in conf/model/; the choices: cogvideox-5b-i2v, "),
        ("model=tiny-ltx-2", "conf/model/; did you mean model=tiny-ltx2? the choices: cogvideox-5b-i2v, "),
        ("memory=nonne", "memory=nonne is not one of the memory choices in conf/memory/; did you mean memory=none?"),
        ("model.num_inferenc_steps=3", "did you mean model.num_inference_steps?"),
    ],
)
def test_a_misspelt_override_is_one_sentence_with_the_valid_choices(override, sentence) -> None:
    """In-process: the check run.py makes before anything else (its exit path is tested once, below)."""
    from batch_runner.errors import UserError
    from batch_runner.run.overrides import check_overrides

    with pytest.raises(UserError) as refused:
        check_overrides(["manifest=jobs.csv", "model=tiny", override], ROOT / "conf")
    assert sentence in str(refused.value), refused.value
    assert "\n" not in str(refused.value)


def test_a_misspelt_override_is_one_line_and_exit_2_on_the_command_line(tmp_path: Path) -> None:
    proc = run_cli("manifest=jobs.csv", "model=tiny", "memroy=none", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("error: There is no setting 'memroy' among the settings"), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_valid_overrides_pass_the_check() -> None:
    from batch_runner.run.overrides import check_overrides

    check_overrides(
        ["manifest=a.csv", "model=tiny", "memory.plan=none", "ids=[a,b]", "hydra.run.dir=.", "--cfg", "job", "seed=3"],
        ROOT / "conf",
    )
