"""Faults a long batch run meets, each on the CPU with model=tiny: bad rows, bad images, long prompts,
errors and out-of-memory while generating, a killed multi-process run, and leftovers of one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from batch_runner.errors import UserError
from batch_runner.outputs.storage import mark_output_dir
from batch_runner.outputs.video import read_video
from batch_runner.replica import planner
from batch_runner.replica import replica as replica_module
from batch_runner.replica.replica import out_of_memory_summary
from batch_runner.run import runner
from tests.conftest import ROOT, accelerate_cpu, photo, run_cli, run_config, write_manifest

pytestmark = pytest.mark.slow  # its in-process tests too: each makes real rows (about a minute)


# --- helpers ------------------------------------------------------------------------------------------


def tree(root: Path, skip: Path | None = None) -> dict[str, int]:
    """Every file under `root` (except under `skip`) -> size."""
    files = {}
    for path in root.rglob("*"):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_file():
            files[str(path.relative_to(root))] = path.stat().st_size
    return files


RUN_OUTPUTS = (".mp4", ".parquet", ".jsonl", ".json", ".yaml", ".html", ".jpg", ".tar", ".partial")


def repo_status() -> set[str]:
    """Files git sees in the repository (tracked, untracked or ignored) of the kinds a run writes.

    Only those kinds, outside docs/ and tests/: other sessions edit sources, docs and tests meanwhile.
    """
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--ignored"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    entries = set()
    for line in out.splitlines():
        path = line[3:].strip('"')
        if path.startswith(("docs/", "tests/", ".venv/", ".pytest_cache/", ".ruff_cache/", ".hypothesis/")):
            continue
        if path.endswith(RUN_OUTPUTS) or "evil" in path:
            entries.add(line)
    return entries


def results_of(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet").set_index("id", drop=False)


def records_in_parts(out: Path) -> list[dict]:
    """Every complete JSON line of every part file (a line torn by a kill is skipped)."""
    records = []
    for part in sorted((out / "parts").glob("*.jsonl")):
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line) | {"_part": part.name})
            except json.JSONDecodeError:
                continue
    return records


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process it started, as a crash or a preempted node would."""
    pids = process_tree(proc.pid)
    for pid in pids:  # freeze first, so no process finishes a row while the others die
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)


def good_rows(folder: Path, count: int, prefix: str = "good") -> list[dict]:
    return [
        {"id": f"{prefix}{i}", "image": str(photo(folder / f"{prefix}{i}.png", seed=i)), "prompt": f"a red boat {i}"}
        for i in range(count)
    ]


# --- invalid rows -------------------------------------------------------------------------------------


def mixed_manifest(tmp_path: Path) -> tuple[Path, dict[str, tuple[int, str, str]]]:
    """Good rows among every kind of invalid one; bad id -> (row number, column, words of the reason)."""
    images = tmp_path / "inputs"
    one = str(photo(images / "one.png"))
    two = str(photo(images / "two.jpg", (90, 140), seed=1))
    rows = [
        {"id": "good-a", "image": one, "prompt": "a lighthouse", "seed": 5},
        {"id": "no-image", "image": str(images / "absent.png"), "prompt": "x", "seed": 1},
        {"id": "good-a", "image": two, "prompt": "the same id again", "seed": 1},
        {"id": "empty-prompt", "image": one, "prompt": "", "seed": 1},
        {"id": "bad-seed", "image": one, "prompt": "x", "seed": "seven"},
        {"id": "thirteen", "image": one, "prompt": "x", "seed": 1, "num_frames": 13},
        {"id": "../evil", "image": one, "prompt": "x", "seed": 1},
        {"id": "odd-size", "image": one, "prompt": "x", "seed": 1, "height": 50, "width": 96},
        {"id": "good-b", "image": two, "prompt": "a windmill", "seed": 2},
    ]
    bad = {
        "no-image": (2, "image", "does not exist"),
        "good-a": (3, "id", "duplicate id"),
        "empty-prompt": (4, "prompt", "prompt is empty"),
        "bad-seed": (5, "seed", "not a whole number"),
        "thirteen": (6, "num_frames", "nearest valid value is 17"),
        "../evil": (7, "id", "outside output_dir"),
        "odd-size": (8, "height/width", "nearest valid size"),
    }
    return write_manifest(tmp_path / "jobs.csv", rows), bad


def test_invalid_rows_refuse_the_whole_run_and_write_nothing(tmp_path):
    manifest, bad = mixed_manifest(tmp_path)
    out = tmp_path / "out"
    before_tmp, before_repo = tree(tmp_path), repo_status()

    result = run_cli(f"manifest={manifest}", "model=tiny", f"output_dir={out}")

    assert result.returncode == 2, result.stderr[-3000:]
    for row_id, (row, column, words) in bad.items():
        line = f"row {row} (id {row_id!r}), column '{column}':"
        matching = [text for text in result.stderr.splitlines() if line in text]
        assert matching, f"stderr does not name {line}\n{result.stderr[-3000:]}"
        assert words in matching[0]
    assert "on_invalid=skip" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())
    assert tree(tmp_path) == before_tmp
    assert repo_status() == before_repo


def test_invalid_rows_skipped_are_recorded_failed_and_the_rest_made(tmp_path):
    manifest, bad = mixed_manifest(tmp_path)
    out = tmp_path / "out"
    before_tmp, before_repo = tree(tmp_path), repo_status()

    result = run_cli(f"manifest={manifest}", "model=tiny", f"output_dir={out}", "on_invalid=skip")

    assert result.returncode == 0, result.stderr[-3000:]
    table = results_of(out)
    assert table["id"].is_unique
    # The duplicate shares its id with good-a, the first row of that id, which is made; the duplicate
    # is recorded under its row-number id, as a blank id is: one results row per manifest row.
    assert len(table) == 9
    assert table.loc["good-a", "status"] == "ok"
    assert table.loc["row000003", "status"] == "failed"
    assert "duplicate id, also used by row 1" in table.loc["row000003", "error"]
    assert table.loc["good-b", "status"] == "ok"
    for row_id in ("good-a", "good-b"):
        frames, _ = read_video(out / table.loc[row_id, "video_path"])
        assert len(frames) == 9
    assert "duplicate id" in result.stderr
    for row_id, (_, column, words) in bad.items():
        if row_id == "good-a":
            continue
        assert table.loc[row_id, "status"] == "failed", row_id
        error = table.loc[row_id, "error"]
        assert error.startswith("invalid row:") and f"column '{column}'" in error and words in error, error
        assert pd.isna(table.loc[row_id, "video_path"])
    assert set(table["id"]) == {"good-a", "good-b", "row000003", *bad}
    # A refused row keeps the inputs it gave: the table is a manifest of them again.
    again = table.loc["row000003"]
    assert (again["prompt"], again["image"]) == ("the same id again", str(tmp_path / "inputs" / "two.jpg"))
    assert table.loc["no-image", "image"] == str(tmp_path / "inputs" / "absent.png")
    assert table.loc["bad-seed", "prompt"] == "x" and pd.isna(table.loc["empty-prompt", "prompt"])
    videos = sorted(p.name for p in (out / "videos").iterdir())
    assert videos == ["good-a.mp4", "good-b.mp4"]
    summary = json.loads((out / "report.json").read_text())
    assert (summary["ok"], summary["failed"]) == (2, len(bad))

    # Nothing outside output_dir: not beside it, not in the repository the command ran from.
    after = tree(tmp_path, skip=out)
    assert after == before_tmp
    assert repo_status() == before_repo
    assert not (out.parent / "evil.mp4").exists() and not (out / "evil.mp4").exists()

    # A resume does not turn the made good-a into the failed duplicate. (In-process, the runner as run.py
    # calls it: the command line is the run above.)
    assert runner.run(run_config(f"manifest={manifest}", "model=tiny", f"output_dir={out}", "on_invalid=skip")) == 0
    table = results_of(out)
    assert table.loc["good-a", "status"] == "ok" and table.loc["good-b", "status"] == "ok"
    assert tree(tmp_path, skip=out) == before_tmp


# --- rows that fail on their own --------------------------------------------------------------------


LONG_PROMPT = " ".join(f"a slow pan across harbour number {i} with gulls and rain" for i in range(40))


@pytest.fixture(scope="module")
def broken_inputs_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    images = folder / "inputs"
    whole = photo(images / "whole.jpg", (200, 150)).read_bytes()
    (images / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (images / "text.png").write_text("this is a text file, not a picture\n")
    Image.new("L", (4000, 4000)).save(images / "bomb.png")  # 16 Mpixels in a few KB
    rows = [
        *good_rows(images, 2),
        {"id": "truncated", "image": str(images / "truncated.jpg"), "prompt": "a fox"},
        {"id": "text", "image": str(images / "text.png"), "prompt": "a fox"},
        {"id": "bomb", "image": str(images / "bomb.png"), "prompt": "a fox"},
        {"id": "long", "image": str(photo(images / "long.png", seed=9)), "prompt": LONG_PROMPT},
    ]
    manifest = write_manifest(folder / "jobs.csv", rows)
    out = folder / "out"
    # In-process, the runner as run.py calls it: what is checked is in the output folder.
    assert (
        runner.run(run_config(f"manifest={manifest}", "model=tiny", f"output_dir={out}", "max_image_pixels=1000000"))
        == 0
    )
    return out


def test_undecodable_images_fail_their_row_only(broken_inputs_run):
    out = broken_inputs_run
    table = results_of(out)
    assert list(table["status"]) == ["ok", "ok", "failed", "failed", "failed", "ok"]
    assert table.loc["truncated", "error"].startswith("image: cannot decode image 'truncated.jpg'")
    assert "truncated" in table.loc["truncated", "error"].split(":", 2)[2]
    assert table.loc["text", "error"].startswith("image: cannot decode image 'text.png'")
    bomb = table.loc["bomb", "error"]
    assert bomb.startswith("image: image is 4000x4000 = 16000000 pixels") and "max_image_pixels" in bomb
    for row_id in ("truncated", "text", "bomb"):
        assert not (out / "videos" / f"{row_id}.mp4").exists()
    for row_id in ("good0", "good1", "long"):
        frames, _ = read_video(out / "videos" / f"{row_id}.mp4")
        assert frames.shape == (9, 64, 96, 3)
    summary = json.loads((out / "report.json").read_text())
    assert (summary["ok"], summary["failed"]) == (3, 3)


def test_long_prompt_is_truncated_with_a_warning_on_its_row(broken_inputs_run):
    out = broken_inputs_run
    table = results_of(out)
    from batch_runner.families.tokenizer import tiny_tokenizer

    tokens = len(tiny_tokenizer()(LONG_PROMPT).input_ids)
    assert tokens > 64
    assert table.loc["long", "status"] == "ok"
    assert table.loc["long", "warnings"] == f"prompt truncated to 64 tokens (it has {tokens})"
    assert table.loc["long", "prompt"] == LONG_PROMPT  # the row keeps what was asked for
    assert table.drop(index="long")["warnings"].isna().all()


# --- errors while generating, in this process -------------------------------------------------------


def run_here(tmp_path: Path, rows: list[dict], *overrides: str) -> Path:
    manifest = write_manifest(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    cfg = run_config(f"manifest={manifest}", "model=tiny", f"output_dir={out}", *overrides)
    assert runner.run(cfg) == 0
    return out


def simulate_a_gpu_that_fits_only_short_rows(monkeypatch) -> None:
    """Plans made as on a GPU (on the CPU none are), where no plan fits a row of more than 9 frames.
    Every tiny row fits any real budget, so the refusal is the planner's one faked part: its real
    estimates are tests/test_planner_rows.py's."""
    plan_rows, choose_plan = planner.plan_rows, planner.choose_plan

    def choose(model, workload, *rest):
        if workload.frames > 9:
            raise UserError("No memory plan fits: sequential_cpu_offload needs ~25.00 GiB GPU > 24.00.")
        return choose_plan(model, workload, *rest)

    monkeypatch.setattr(planner, "choose_plan", choose)
    monkeypatch.setattr(planner, "place", lambda cfg, device, lws, jobs=(), model=None: plan_rows(cfg, 24.0, lws, jobs))


def rows_one_too_long(folder: Path) -> list[dict]:
    return [*good_rows(folder, 2), good_rows(folder, 1, prefix="long")[0] | {"num_frames": 17}]


def test_rows_no_memory_plan_fits_refuse_the_run_before_any_is_made(tmp_path, monkeypatch):
    simulate_a_gpu_that_fits_only_short_rows(monkeypatch)
    manifest = write_manifest(tmp_path / "jobs.csv", rows_one_too_long(tmp_path / "inputs"))
    out = tmp_path / "out"
    with pytest.raises(UserError) as refused:
        runner.run(run_config(f"manifest={manifest}", "model=tiny", f"output_dir={out}"))
    message = str(refused.value)
    assert message.startswith("rows of 64x96x17 ('long0'): No memory plan fits: ")
    assert "Or make the rows shorter: at 64x96, num_frames=9 fits." in message
    assert "Or pass on_invalid=skip to record the rows no plan fits as failed and make the others." in message
    assert not list((out / "videos").iterdir())


def test_rows_no_memory_plan_fits_are_recorded_failed_under_skip_and_the_rest_made(tmp_path, monkeypatch):
    simulate_a_gpu_that_fits_only_short_rows(monkeypatch)
    out = run_here(tmp_path, rows_one_too_long(tmp_path / "inputs"), "on_invalid=skip")
    table = results_of(out)
    assert list(table["status"]) == ["ok", "ok", "failed"]
    error = table.loc["long0", "error"]
    assert error.startswith("No memory plan fits: ") and error.endswith("at 64x96, num_frames=9 fits.")
    assert pd.isna(table.loc["long0", "memory_plan"])  # it ran under none
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["good0.mp4", "good1.mp4"]


def test_an_error_under_two_plans_fails_that_row_and_the_run_goes_on(tmp_path, monkeypatch):
    real_make = replica_module.Replica.make
    calls: list[tuple[str, str]] = []

    def make(self, job, *args, **kwargs):
        calls.append((job.id, self.placement_for(job).plan))
        if job.id == "good1":
            raise RuntimeError("the sampler diverged")
        return real_make(self, job, *args, **kwargs)

    monkeypatch.setattr(replica_module.Replica, "make", make)
    out = run_here(tmp_path, good_rows(tmp_path / "inputs", 4), "chunk_size=1")

    table = results_of(out)
    # Not out of memory: redone once under the next plan, in case the plan was at fault.
    assert [c for c in calls if c[0] == "good1"] == [("good1", "none"), ("good1", "text_offload")]
    assert table.loc["good1", "status"] == "failed"
    assert table.loc["good1", "error"] == "RuntimeError: the sampler diverged"
    assert table.loc["good1", "warnings"] == (
        "failed under plan none (RuntimeError: the sampler diverged), redone with text_offload"
    )
    assert not (out / "videos" / "good1.mp4").exists()
    for row_id in ("good0", "good2", "good3"):
        assert table.loc[row_id, "status"] == "ok"
        # It failed under both: the row's fault, not the plan's, so the next rows keep the faster plan.
        assert table.loc[row_id, "memory_plan"] == "none"
        assert (out / "videos" / f"{row_id}.mp4").stat().st_size > 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["failures"] == [{"reason": "RuntimeError: the sampler diverged", "count": 1, "ids": ["good1"]}]


def test_an_error_only_one_plan_makes_is_redone_under_the_next_and_the_rows_after_avoid_it(tmp_path, monkeypatch):
    real_make = replica_module.Replica.make
    calls: list[tuple[str, str]] = []

    def make(self, job, *args, **kwargs):
        calls.append((job.id, self.placement_for(job).plan))
        if self.placement_for(job).plan == "none":
            raise RuntimeError("Tensor on device meta is not on the expected device")
        return real_make(self, job, *args, **kwargs)

    monkeypatch.setattr(replica_module.Replica, "make", make)
    out = run_here(tmp_path, good_rows(tmp_path / "inputs", 3), "chunk_size=1")

    table = results_of(out)
    assert calls == [("good0", "none"), ("good0", "text_offload"), ("good1", "text_offload"), ("good2", "text_offload")]
    assert list(table["status"]) == ["ok", "ok", "ok"]
    assert list(table["memory_plan"]) == ["text_offload"] * 3
    assert table.loc["good0", "warnings"].startswith("failed under plan none (RuntimeError: Tensor on device meta")
    assert table.loc["good0", "warnings"].endswith("redone with text_offload")


def test_non_finite_frames_are_redone_once_at_the_familys_higher_precision(tmp_path, monkeypatch):
    real_make = replica_module.Replica.make
    vae_dtypes: list[torch.dtype] = []

    def make(self, job, *args, **kwargs):
        vae_dtypes.append(self.pipe.vae.dtype)
        if job.id == "good1" and len(vae_dtypes) == 2:
            raise replica_module.BadFrames("the frames hold NaN or infinite values (the latents went non-finite)")
        return real_make(self, job, *args, **kwargs)

    monkeypatch.setattr(replica_module.Replica, "make", make)
    out = run_here(tmp_path, good_rows(tmp_path / "inputs", 3), "chunk_size=1", "model.dtype=bfloat16")

    table = results_of(out)
    assert vae_dtypes == [torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16]
    assert list(table["status"]) == ["ok", "ok", "ok"]
    assert table.loc["good1", "warnings"] == (
        "the frames hold NaN or infinite values (the latents went non-finite); redone with the VAE in float32"
    )
    assert table.loc["good1", "memory_plan"] == "none"  # not a plan's fault: no step down


def test_out_of_memory_retries_the_row_one_plan_down(tmp_path, monkeypatch):
    real_make = replica_module.Replica.make
    calls: list[tuple[str, str]] = []

    def make(self, job, *args, **kwargs):
        calls.append((job.id, self.plan))
        if job.id == "good1" and len([c for c in calls if c[0] == "good1"]) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_make(self, job, *args, **kwargs)

    monkeypatch.setattr(replica_module.Replica, "make", make)
    out = run_here(tmp_path, good_rows(tmp_path / "inputs", 3), "chunk_size=1")

    table = results_of(out)
    assert [c for c in calls if c[0] == "good1"] == [("good1", "none"), ("good1", "text_offload")]
    assert list(table["status"]) == ["ok", "ok", "ok"]
    assert table.loc["good0", "memory_plan"] == "none"
    assert table.loc["good1", "memory_plan"] == "text_offload"
    # Raised before the pipeline call, so with no stage; the allocator's request is kept.
    assert table.loc["good1", "warnings"] == (
        "out of GPU memory under plan none (asked for 20.00 GiB), redone with text_offload"
    )
    assert table.loc["good2", "memory_plan"] == "text_offload"  # the replica stays down the ladder
    for row_id in table["id"]:
        frames, _ = read_video(out / "videos" / f"{row_id}.mp4")
        assert len(frames) == 9


# torch 2.11's message under a 12 GiB cap (docs/experiments/2026-12-04e).
CAPPED_OOM = (
    "CUDA out of memory. Tried to allocate 330.00 MiB. GPU 0 has a total capacity of 139.80 GiB of which "
    "127.09 GiB is free. Including non-PyTorch memory, this process has 12.64 GiB memory in use. 12.00 GiB "
    "allowed; Of the allocated memory 11.09 GiB is allocated by PyTorch, and 831.61 MiB is reserved by PyTorch "
    "but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)


def test_running_out_of_memory_in_a_step_names_the_step_and_what_the_allocator_said(tmp_path, monkeypatch):
    """The row's warning says where the video ran out (a plan that runs out in its steps and one
    that runs out in its decode need different budgets) and what torch's allocator asked for and held."""
    real_make = replica_module.Replica.make
    failed: list[bool] = []

    def make(self, job, *args, **kwargs):
        if job.id != "good1" or failed:
            return real_make(self, job, *args, **kwargs)
        calls = []

        def second_call_runs_out(module, inputs):
            calls.append(1)
            if len(calls) == 2:
                failed.append(True)
                raise torch.OutOfMemoryError(CAPPED_OOM)

        hook = self.denoisers[0].register_forward_pre_hook(second_call_runs_out)
        try:
            return real_make(self, job, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(replica_module.Replica, "make", make)
    out = run_here(tmp_path, good_rows(tmp_path / "inputs", 2), "chunk_size=1", "model.num_inference_steps=3")

    table = results_of(out)
    assert list(table["status"]) == ["ok", "ok"]
    assert table.loc["good1", "warnings"] == (
        "out of GPU memory under plan none in denoising step 2 of 3 (asked for 330.00 MiB with 11.09 GiB "
        "allocated), redone with text_offload"
    )


def test_the_summary_of_an_out_of_memory_error_keeps_what_it_names():
    assert out_of_memory_summary(torch.OutOfMemoryError(CAPPED_OOM)) == "asked for 330.00 MiB with 11.09 GiB allocated"
    assert out_of_memory_summary(RuntimeError("CUDA out of memory")) == ""


def test_the_retry_after_running_out_of_memory_starts_with_the_failed_calls_memory_freed(tmp_path, monkeypatch):
    """The failed call's activations live in its frames, which the exception's traceback holds while
    it is being handled: the retry must come after, or it starts with that memory still taken (a
    12 GiB run of Cosmos-Predict2.5 ran out again under the lower plan, docs/experiments/2026-12-04e)."""
    real_make = replica_module.Replica.make

    class Activations:
        """Stands for the tensors a forward pass had allocated when it ran out of memory."""

    held: list[weakref.ref] = []
    alive_at_retry: list[bool] = []

    def make(self, job, *args, **kwargs):
        if job.id == "good1" and not held:
            activations = Activations()
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 330.00 MiB")
        if job.id == "good1":
            alive_at_retry.append(held[0]() is not None)
        return real_make(self, job, *args, **kwargs)

    monkeypatch.setattr(replica_module.Replica, "make", make)
    out = run_here(tmp_path, good_rows(tmp_path / "inputs", 2), "chunk_size=1")

    assert alive_at_retry == [False]
    assert list(results_of(out)["status"]) == ["ok", "ok"]


# --- a killed run, resumed ----------------------------------------------------------------------------


def test_a_killed_two_process_run_resumes_with_every_row_exactly_once(tmp_path):
    rows = good_rows(tmp_path / "inputs", 10)
    manifest = write_manifest(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    args = [
        f"manifest={manifest}",
        "model=tiny",
        f"output_dir={out}",
        "model.num_frames=17",
        "model.num_inference_steps=12",
        "chunk_size=2",
    ]
    command = [*accelerate_cpu(2), str(ROOT / "run.py"), *args]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if len([r for r in records_in_parts(out) if r.get("status") == "ok"]) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "first.log").read_text()
        kill_run(proc)
    finally:
        if proc.poll() is None:
            kill_run(proc)
        log.close()

    finished = {r["id"] for r in records_in_parts(out) if r.get("status") == "ok"}
    assert 2 <= len(finished) < 10, "kill the run earlier (more steps or frames)"
    mtimes = {row_id: (out / "videos" / f"{row_id}.mp4").stat().st_mtime_ns for row_id in finished}
    parts_before = {p.name for p in (out / "parts").glob("*.jsonl")}
    assert not (out / "results.parquet").exists()

    result = run_cli(*args, launcher=accelerate_cpu(2))
    assert result.returncode == 0, result.stderr[-3000:]

    table = pd.read_parquet(out / "results.parquet")
    assert sorted(table["id"]) == sorted(r["id"] for r in rows) and table["id"].is_unique
    assert (table["status"] == "ok").all(), table[["id", "status", "error"]]
    for row in table.to_dict("records"):
        frames, fps = read_video(out / row["video_path"])
        assert frames.shape == (17, 64, 96, 3) and fps == 8
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(f"{r['id']}.mp4" for r in rows)
    assert not list(out.rglob("*.partial"))
    # Rows finished before the kill were neither made again nor rewritten.
    assert {row_id: (out / "videos" / f"{row_id}.mp4").stat().st_mtime_ns for row_id in finished} == mtimes
    remade = {r["id"] for r in records_in_parts(out) if r["_part"] not in parts_before}
    assert remade == {r["id"] for r in rows} - finished
    summary = json.loads((out / "report.json").read_text())
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (10, 0, len(finished))


def test_leftover_temporaries_are_swept_on_the_next_run(tmp_path):
    rows = good_rows(tmp_path / "inputs", 2)
    manifest = write_manifest(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    leftovers = [
        out / "videos" / f".good0.mp4.{os.getpid()}.partial",
        out / "videos" / ".good1.mp4.4242.partial",
        out / ".results.parquet.4242.partial",
        out / "previews" / ".good0.first.jpg.4242.partial",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 1000)
    keep = out / "notes.txt"
    keep.write_text("mine")
    mark_output_dir(out)  # the killed run's folder: that run marked it before writing anything

    result = run_cli(f"manifest={manifest}", "model=tiny", f"output_dir={out}")

    assert result.returncode == 0, result.stderr[-3000:]
    assert "removed 4 unfinished temporary file(s)" in result.stderr
    assert not list(out.rglob("*.partial"))
    assert keep.read_text() == "mine"
    assert (results_of(out)["status"] == "ok").all()
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["good0.mp4", "good1.mp4"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))


def test_a_row_with_a_blank_id_is_recorded_under_its_row_number_id(tmp_path):
    # on_invalid=skip promises one results row per manifest row, also for a row whose id is blank.
    rows = good_rows(tmp_path, 2)
    rows[1]["id"] = ""
    manifest = write_manifest(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"  # in-process: the results are what is tested, not the command line
    assert runner.run(run_config(f"manifest={manifest}", "model=tiny", f"output_dir={out}", "on_invalid=skip")) == 0
    table = results_of(out)
    assert table["id"].tolist() == ["good0", "row000002"]
    assert table["status"].tolist() == ["ok", "failed"]
    assert "column 'id': the id is empty" in table["error"].iloc[1]


def test_an_id_too_long_for_a_file_name_is_recorded_failed_and_the_report_still_written(tmp_path):
    # A 300-character id cannot name a preview file; under on_invalid=skip it crashed the report.
    rows = good_rows(tmp_path, 2)
    rows[1]["id"] = "x" * 300
    manifest = write_manifest(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    assert runner.run(run_config(f"manifest={manifest}", "model=tiny", f"output_dir={out}", "on_invalid=skip")) == 0
    table = results_of(out)
    assert table["status"].tolist() == ["ok", "failed"]
    assert "300 bytes long" in table["error"].iloc[1]
    assert ("x" * 300) in (out / "report.html").read_text()
