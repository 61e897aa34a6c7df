"""What a finished run leaves behind, read back as its users read it: a Hugging Face videofolder,
WebDataset shards, provenance on every row, report.json, report.html in a browser, and a dry run."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from batch_runner.inputs.ids import derive_seed
from batch_runner.outputs.video import read_video
from tests.browser import CHROMIUM, await_in_chromium
from tests.conftest import accelerate_cpu, photo, run_cli, write_manifest

# Tests that start processes are marked slow by tests/conftest.py.

CATEGORIES = {"a": "harbour", "b": "forest", "c": "harbour", "d.v2": "city", "e": "city", "broken": "forest"}
SCORES = {"a": 0.5, "b": 1.25, "c": 2.0, "d.v2": 3.5, "e": 4.0, "broken": 9.0}
OK_IDS = ["a", "b", "c", "d.v2", "e"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-process run (snapshotted as `first`), then the same command again after the broken
    image was replaced (`out`, a resume that makes only that row)."""
    folder = tmp_path_factory.mktemp("outputs")
    images = folder / "inputs"
    rows = []
    for i, row_id in enumerate(CATEGORIES):
        path = images / f"{row_id}.png"
        if row_id == "broken":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
        else:
            photo(path, (120 + 10 * i, 80), seed=i)
        row = {
            "id": row_id,
            "image": f"inputs/{path.name}",
            "prompt": f"scene {row_id}",
            "category": CATEGORIES[row_id],
        }
        rows.append(row | {"score": SCORES[row_id]} | ({"seed": 77} if row_id == "b" else {}))
    manifest = write_manifest(folder / "jobs.csv", rows)
    out = folder / "out"
    args = [
        f"manifest={manifest}",
        "model=tiny",
        f"output_dir={out}",
        "output.format=webdataset",
        "output.shard_size=2",
    ]
    first = run_cli(*args, launcher=accelerate_cpu(2))
    assert first.returncode == 0, first.stderr[-4000:]
    snapshot = folder / "first"
    shutil.copytree(out, snapshot)

    photo(images / "broken.png", (100, 100), seed=42)
    second = run_cli(*args, launcher=accelerate_cpu(2))
    assert second.returncode == 0, second.stderr[-4000:]
    return {"first": snapshot, "out": out, "manifest": manifest, "args": args, "log": first, "resume_log": second}


def test_the_run_made_ok_rows_and_recorded_the_broken_one(runs):
    table = pd.read_parquet(runs["first"] / "results.parquet")
    assert list(table["id"]) == [*OK_IDS, "broken"]
    assert list(table["status"]) == ["ok"] * 5 + ["failed"]
    assert table.set_index("id").loc["broken", "error"].startswith("image: cannot decode image 'broken.png'")
    assert set(table["rank"].dropna()) <= {0, 1}


def test_videofolder_loads_exactly_the_ok_rows(runs, tmp_path):
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("videofolder", data_dir=str(runs["first"]), split="train", cache_dir=str(tmp_path))
    loaded = loaded.cast_column("video", datasets.Video(decode=False))
    assert loaded.num_rows == len(OK_IDS)
    assert {"video", "id", "prompt", "seed", "category", "score"} <= set(loaded.column_names)
    by_id = {example["id"]: example for example in loaded}
    assert sorted(by_id) == sorted(OK_IDS)
    for row_id, example in by_id.items():
        assert example["prompt"] == f"scene {row_id}"
        assert example["seed"] == (77 if row_id == "b" else derive_seed(0, row_id))
        assert example["category"] == CATEGORIES[row_id]
        assert example["score"] == pytest.approx(SCORES[row_id])
        video = Path(example["video"]["path"])
        assert video.name == f"{row_id}.mp4" and video.parent.parent == runs["first"]
        frames, _ = read_video(video)
        assert frames.shape == (9, 64, 96, 3)


def read_shards(folder: Path) -> list[dict]:
    import webdataset as wds

    shards = sorted(str(p) for p in (folder / "shards").glob("shard-*.tar"))
    assert shards
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))


def test_webdataset_shards_hold_the_ok_rows(runs):
    samples = read_shards(runs["first"])
    assert sorted(s["__key__"] for s in samples) == sorted(i.replace(".", "_") for i in OK_IDS)
    assert len(list((runs["first"] / "shards").glob("*.tar"))) == 3  # 5 samples, 2 a shard
    for sample in samples:
        assert {k for k in sample if not k.startswith("__")} == {"mp4", "json"}
        meta = json.loads(sample["json"])
        assert meta["id"].replace(".", "_") == sample["__key__"]
        assert meta["prompt"] == f"scene {meta['id']}"
        assert (meta["category"], meta["score"]) == (CATEGORIES[meta["id"]], SCORES[meta["id"]])
        assert sample["mp4"] == (runs["first"] / "videos" / f"{meta['id']}.mp4").read_bytes()


def test_a_resume_adds_the_new_row_to_the_shards_and_duplicates_nothing(runs):
    table = pd.read_parquet(runs["out"] / "results.parquet")
    assert (table["status"] == "ok").all()
    samples = read_shards(runs["out"])
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == sorted(i.replace(".", "_") for i in [*OK_IDS, "broken"])
    # The layout follows the manifest (2 a shard, in order): the full shards before the new sample are
    # kept byte for byte; the last one now holds e and the new sample, broken.
    first_shards = sorted(p.name for p in (runs["first"] / "shards").glob("*.tar"))
    for name in first_shards[:2]:
        assert (runs["out"] / "shards" / name).read_bytes() == (runs["first"] / "shards" / name).read_bytes()
    assert sorted(p.name for p in (runs["out"] / "shards").glob("*.tar")) == first_shards
    with tarfile.open(runs["out"] / "shards" / "shard-000002.tar") as tar:
        assert tar.getnames() == ["e.mp4", "e.json", "broken.mp4", "broken.json"]
    for row_id in OK_IDS:  # not made again
        video = f"videos/{row_id}.mp4"
        assert (runs["out"] / video).stat().st_mtime_ns == (runs["first"] / video).stat().st_mtime_ns
    summary = json.loads((runs["out"] / "report.json").read_text())
    assert (summary["ok"], summary["failed"], summary["skipped"], summary["made_this_run"]) == (6, 0, 5, 1)


def test_every_row_carries_its_provenance(runs):
    table = pd.read_parquet(runs["first"] / "results.parquet")
    config = (runs["first"] / "config.yaml").read_bytes()
    import diffusers
    import torch
    import transformers

    expected = {
        "model": "tiny-cogvideox",  # model=tiny composes tiny-cogvideox
        "scheduler": "CogVideoXDPMScheduler",
        "memory_plan": "none",
        "dtype": "float32",
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
        "batch_runner_version": "0.1.0",
        "gpu": "cpu",
        "config_hash": hashlib.sha256(config).hexdigest()[:12],
    }
    for column, value in expected.items():
        assert (table[column] == value).all(), (column, table[column].tolist())
    seeds = dict(zip(table["id"], table["seed"], strict=True))
    assert seeds == {i: 77 if i == "b" else derive_seed(0, i) for i in [*OK_IDS, "broken"]}
    assert table["params_hash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert table["finished_at"].notna().all()
    assert list(table["category"]) == [CATEGORIES[i] for i in table["id"]]


def test_report_json_has_counts_throughput_slowest_and_failures(runs):
    summary = json.loads((runs["first"] / "report.json").read_text())
    table = pd.read_parquet(runs["first"] / "results.parquet")
    assert (summary["rows"], summary["ok"], summary["failed"], summary["made_this_run"]) == (6, 5, 1, 5)
    assert summary["videos_per_hour"] > 0
    slowest = summary["slowest"]
    assert {s["id"] for s in slowest} <= set(OK_IDS) and len(slowest) == 5
    assert [s["seconds"] for s in slowest] == sorted((s["seconds"] for s in slowest), reverse=True)
    assert slowest[0]["seconds"] == table["seconds"].max()
    [failure] = summary["failures"]
    assert failure["reason"].startswith("image: cannot decode image 'broken.png'")  # as raised
    assert summary["device"] == "CPU" and summary["device_hours"] > 0
    assert (failure["count"], failure["ids"]) == (1, ["broken"])
    assert sum(p["rows"] for p in summary["per_process"].values()) == 5


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_report_html_renders_every_row_and_the_failure(runs, tmp_path):
    page = runs["first"] / "report.html"
    text = page.read_text(encoding="utf-8")
    for row_id in [*OK_IDS, "broken"]:
        assert f"data-id='{row_id}'" in text
    assert re.search(r"<div class='card failed' id='row\d+' data-id='broken'>", text)
    assert text.count("class='card ok'") == 5
    assert "Slowest rows" in text and "Failures by reason" in text and "CPU-hours" in text
    for row_id in OK_IDS:
        for name in ("input", "first", "middle", "last"):
            assert f"src='previews/{row_id}.{name}.jpg'" in text
            assert (runs["first"] / "previews" / f"{row_id}.{name}.jpg").is_file()

    shot = tmp_path / "report.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(pixels, axis=0)}
    # Every preview decodes in the browser (lazy pictures made eager: no scrolling in a test).
    shown = await_in_chromium(
        page.as_uri(),
        """(async () => {
            const images = [...document.images];
            images.forEach((image) => { image.loading = 'eager'; });
            const shown = (image) => image.decode().then(() => image.naturalWidth > 0, () => false);
            const decoded = await Promise.all(images.map(shown));
            return [images.length, decoded.filter(Boolean).length];
        })()""",
        tmp_path / "profile-images",
    )
    assert shown == [4 * len(OK_IDS), 4 * len(OK_IDS)]
    assert (0xDD, 0x33, 0x33) in colours  # the failed card's red border (#d33)
    assert (0xFF, 0xF3, 0xF3) in colours  # and its pink background (#fff3f3)
    assert (0xCF, 0xD8, 0xCF) in colours  # the ok cards' border (#cfd8cf)


def test_dry_run_with_two_processes_plans_without_loading_or_writing(runs, tmp_path, capsys):
    fresh = tmp_path / "never"
    args = [a for a in runs["args"] if not a.startswith("output_dir=")]
    result = run_cli(*args, f"output_dir={fresh}", "dry_run=true", launcher=accelerate_cpu(2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 rows, 6 valid, 0 problem(s)" in result.stdout
    assert "0 rows already done, 6 to make" in result.stdout
    assert "2 process(es)" in result.stdout
    assert "process 0: ~3 rows (a, b, c)" in result.stdout
    assert "process 1: ~3 rows (d.v2, e, broken)" in result.stdout
    assert "memory plan: none" in result.stdout
    assert "dry run: no model loaded, nothing written." in result.stdout
    assert result.stdout.count("dry run:") == 1  # printed by the main process only
    assert "batch_runner.replica.replica" not in result.stderr  # no replica (no model) was built
    assert not fresh.exists()

    # Over the finished run: everything is done, and nothing there changes. (In-process: the
    # launch's own parts are checked above; this is about the folder.)
    from batch_runner.run import runner
    from tests.conftest import run_config

    before = {p: p.stat().st_mtime_ns for p in runs["out"].rglob("*")}
    capsys.readouterr()
    assert runner.run(run_config(*runs["args"], "dry_run=true")) == 0
    assert "6 rows already done, 0 to make" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in runs["out"].rglob("*")} == before
