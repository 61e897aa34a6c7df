"""Start-up marks (batch_runner/run/startup.py) and how scripts/scaling.py reads them."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch_runner.run import startup
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def fresh_marks():
    startup.reset()
    yield
    startup.reset()


def scaling_script():
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "scripts" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_proc(root: Path, start_ticks: int, uptime: float, btime: int, comm: str = "python") -> Path:
    """A /proc of one process: its stat (field 22: start in ticks after boot), the uptime, a boot time."""
    (root / "self").mkdir(parents=True, exist_ok=True)
    fields = ["S", "1", *["0"] * 17, str(start_ticks), "12345", "678"]  # fields 3.. of /proc/self/stat
    (root / "self" / "stat").write_text(f"4242 ({comm}) {' '.join(fields)}\n")
    (root / "uptime").write_text(f"{uptime:.2f} 1.00\n")
    (root / "stat").write_text(f"cpu  1 2 3 4\nbtime {btime}\n")
    return root


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(0, 10**9),
    age=st.integers(0, 10**7),
    hertz=st.sampled_from([100, 250, 1000]),
    now=st.floats(1e9, 4e9),
    btime=st.integers(0, 2**31),
    comm=st.text(alphabet="ab )(x1", max_size=12),
)
def test_process_start_is_now_less_its_age_whatever_the_boot_time_says(start, age, hertz, now, btime, comm) -> None:
    """The age is uptime less the start after boot, both counted by the kernel from the same boot; the
    boot time of /proc/stat, which drifts from the wall clock, must not move the answer."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        uptime = (start + age) / hertz
        proc = fake_proc(Path(folder), start, uptime, btime, comm)
        started = startup.started_at(proc, lambda: now, hertz)
    assert started == pytest.approx(now - age / hertz, abs=0.006)  # /proc/uptime has 10 ms
    assert started <= now


def test_a_booted_vm_whose_clock_was_set_after_boot_reports_the_seconds_since_the_process_started(tmp_path) -> None:
    """The issue's case: btime says boot was 82 s earlier than it was; the process started 7 s ago."""
    now = 1_800_000_000.0
    proc = fake_proc(tmp_path, start_ticks=2_300, uptime=30.0, btime=int(now - 30.0 - 82.0))
    assert now - startup.started_at(proc, lambda: now, 100) == pytest.approx(7.0)


def test_a_proc_that_cannot_tell_gives_no_start(tmp_path) -> None:
    assert startup.started_at(tmp_path / "missing", time.time, 100) is None
    proc = fake_proc(tmp_path, 100, 5.0, 0)
    (proc / "uptime").write_text("garbage\n")
    assert startup.started_at(proc, time.time, 100) is None


@pytest.mark.slow
def test_a_child_reports_a_start_between_the_moments_before_and_after_it_was_launched() -> None:
    """Measured on this machine's own /proc against its wall clock (no drift to hide behind)."""
    import subprocess
    import sys

    code = "import batch_runner.run.startup as s; print(repr(s.process_started_at()))"
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    after = time.time()
    started = float(child.communicate(timeout=60)[0])
    assert before - 0.03 <= started <= after + 0.03, (before, started, after)  # ticks and uptime: 10 ms each


def test_the_process_start_is_read_once_and_precedes_every_import_of_this_test_run() -> None:
    started = startup.process_started_at()
    assert startup.process_started_at() == started
    assert started < time.time() - 0.5  # pytest's imports ran before this test
    assert started == pytest.approx(psutil.Process(os.getpid()).create_time(), abs=120)  # same process, roughly


def test_only_a_phases_first_end_counts_and_marks_come_in_phase_order() -> None:
    startup.mark("replica")
    startup.mark("imports")
    first = startup.marks()["replica"]
    time.sleep(0.01)
    startup.mark("replica")  # a later row, not start-up
    assert startup.marks()["replica"] == first
    assert list(startup.marks()) == ["process_start", "imports", "replica"]


def test_saved_marks_and_summary(tmp_path: Path) -> None:
    for phase in startup.PHASES:
        startup.mark(phase)
    startup.save(tmp_path / "logs" / "startup-rank00003.json", rank=3)
    saved = json.loads((tmp_path / "logs" / "startup-rank00003.json").read_text())
    assert saved["rank"] == 3 and saved["pid"] == os.getpid()
    assert set(startup.PHASES) <= set(saved)
    text = startup.summary()
    assert text.startswith("first video ") and "imports " in text and "first_step " in text


def test_a_split_phase_keeps_its_parts_in_the_file_and_the_summary(tmp_path: Path) -> None:
    for phase in startup.PHASES:
        startup.mark(phase)
    startup.split("replica", {"plan": 0.52, "weights": 4.06})
    startup.split("replica", {"plan": 9.0})  # a later replica (a test's second run), not start-up
    startup.save(tmp_path / "startup-rank00000.json", rank=0)
    saved = json.loads((tmp_path / "startup-rank00000.json").read_text())
    assert saved["replica_parts"] == {"plan": 0.52, "weights": 4.06}
    assert " (plan 0.5, weights 4.1), first_step " in startup.summary()
    startup.adopt(time.time(), time.time())  # a run the warm server forked counts its own start-up
    assert "(plan" not in startup.summary()


def test_the_replica_times_each_part_of_its_building() -> None:
    """What the start-up's `replica` phase is made of, on the CPU with the tiny Wan preset and its LoRA."""
    import torch

    from batch_runner.replica.replica import Replica
    from tests.conftest import run_config

    began = time.perf_counter()
    replica = Replica(run_config("manifest=x", "model=tiny-wan-lightx2v"), torch.device("cpu"))
    took = time.perf_counter() - began
    parts = replica.build_seconds
    assert list(parts) == ["family_imports", "plan", "weights", "prepare", "host_sharing", "compile", "placement"]
    assert all(s >= 0 for s in parts.values()) and sum(parts.values()) <= took + 0.01


def test_scaling_reads_each_ranks_phases_from_the_launch(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    launched = 1000.0
    for rank, offset in ((0, 0.0), (1, 2.0)):
        marks = {"rank": rank, "process_start": 1010.0, "interpreter": 1010.5, "imports": 1020.0}
        marks |= {"process_group": 1023.0 + offset}
        marks |= {"replica": 1027.0 + offset, "first_step": 1034.0 + offset, "first_video": 1050.0}
        (logs / f"startup-rank{rank:05d}.json").write_text(json.dumps(marks))
    ranks = scaling_script().startup_of(tmp_path, launched)
    assert [r["launch_to_first_step_s"] for r in ranks] == [34.0, 36.0]
    assert ranks[1]["phases_s"] == {
        "process_start": 10.0,
        "interpreter": 0.5,
        "imports": 9.5,
        "process_group": 5.0,
        "replica": 4.0,
        "first_step": 7.0,
    }


def test_efficiency_compares_whole_commands_with_the_same_budget_and_cache() -> None:
    records = [
        {"gpus": 1, "budget_gib": None, "compile_cache": "warm", "videos_per_hour": 100.0},
        {"gpus": 1, "budget_gib": 8.0, "compile_cache": "warm", "videos_per_hour": 50.0},
        {"gpus": 4, "budget_gib": None, "compile_cache": "warm", "videos_per_hour": 380.0},
        {"gpus": 4, "budget_gib": 8.0, "compile_cache": "warm", "videos_per_hour": 200.0},
        {"gpus": 4, "budget_gib": None, "compile_cache": "cold", "videos_per_hour": 300.0},  # no cold twin
    ]
    scaling_script().with_efficiency(records)
    assert [r.get("efficiency") for r in records] == [1.0, 1.0, 0.95, 1.0, None]


@pytest.mark.parametrize(
    ("cache", "runs"),
    [
        ("per-count", [(1, "warming", "1gpu"), (1, "warm", "1gpu"), (2, "warming", "2gpu"), (2, "warm", "2gpu")]),
        # One cache for the whole script: only its first command fills it, the 2-process one is warm.
        ("shared", [(1, "warming", "shared"), (1, "warm", "shared"), (2, "warm", "shared")]),
    ],
)
def test_the_scaling_script_warms_a_cache_per_gpu_count_or_one_for_all(tmp_path, monkeypatch, cache, runs) -> None:
    """Which commands the script runs, on which compile cache: decided in-process, each launch stubbed
    (the launches themselves are timed by the test below)."""
    script = scaling_script()
    launched = []

    def measure(model, gpus, rows, steps, budget, cache_dir, cache, *rest) -> dict:
        launched.append((gpus, cache, Path(cache_dir).name.split("_")[1]))
        return {"model": model, "gpus": gpus, "budget_gib": budget, "compile_cache": cache, "videos_per_hour": 1.0}

    monkeypatch.setattr(script, "measure", measure)
    monkeypatch.setattr(script.tempfile, "tempdir", str(tmp_path))
    argv = ["scaling.py", "--cpu", "--model", "tiny", "--gpus", "1,2", "--budgets", "none", "--cold", "none"]
    monkeypatch.setattr("sys.argv", [*argv, "--cache", cache, "--out", str(tmp_path / "out")])
    script.main()
    assert launched == runs
    records = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert [(r["gpus"], r["compile_cache"]) for r in records] == [(g, c) for g, c, _ in runs]


@pytest.mark.slow
def test_scaling_script_times_whole_launches_on_the_cpu(tmp_path: Path) -> None:
    """The GPU call runs this script unattended: it must get through a real launch and write records."""
    import subprocess
    import sys

    command = [sys.executable, str(ROOT / "scripts" / "scaling.py"), "--cpu", "--model", "tiny", "--gpus", "1,2"]
    command += ["--rows-per-gpu", "1", "--steps", "1", "--budgets", "none", "--cold", "none", "--cache", "shared"]
    command += ["--overrides", "model.weights=tiny", "--photos", str(ROOT / "examples" / "images")]
    done = subprocess.run([*command, "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((tmp_path / "scaling.json").read_text())
    runs = [(r["gpus"], r["compile_cache"]) for r in records]
    assert runs == [(1, "warming"), (1, "warm"), (2, "warm")]
    assert all("error" not in r and r["ok_rows"] == r["gpus"] for r in records), records
    two = records[-1]
    assert two["efficiency"] > 0 and sorted(two["rows_per_rank"]) == ["0", "1"]  # JSON keys
    assert [p["rank"] for p in two["per_rank"]] == [0, 1]
    assert all(p["launch_to_first_step_s"] > p["phases_s"]["imports"] for p in two["per_rank"])


def test_scaling_script_launches_through_accelerates_module_too(tmp_path: Path, monkeypatch) -> None:
    """`--launcher module`: `python -m accelerate.commands.launch` (no CLI imports), named so in the record.
    Decided in-process, the launch stubbed: that launch line (accelerate_launch with cli=False) is the one
    every two-process run of tests/test_cli.py and the family tests starts for real, and the test above
    runs the script through real launches."""
    script = scaling_script()
    launched = []

    def run(command: list[str], **kwargs) -> SimpleNamespace:
        launched.append(command)
        return SimpleNamespace(returncode=1, stdout="", stderr="stubbed")

    monkeypatch.setattr(script, "subprocess", SimpleNamespace(run=run))
    monkeypatch.setattr(script.tempfile, "tempdir", str(tmp_path))
    argv = ["scaling.py", "--cpu", "--model", "tiny", "--gpus", "2", "--rows-per-gpu", "1", "--steps", "1"]
    argv += ["--budgets", "none", "--cold", "only", "--launcher", "module", "--overrides", "model.weights=tiny"]
    argv += ["--photos", str(ROOT / "examples" / "images")]
    monkeypatch.setattr("sys.argv", [*argv, "--out", str(tmp_path / "out")])
    script.main()
    (command,) = launched
    assert command[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes"]
    assert command[5] == "2" and command[command.index(str(ROOT / "run.py")) + 1].startswith("manifest=")
    (record,) = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert record["launcher"] == "python -m accelerate.commands.launch" and record["compile_cache"] == "cold"
    assert record["command"].startswith("python -m accelerate.commands.launch --cpu --num_processes 2")
    assert record["error"] == "exit 1: stubbed"  # the launch's failure is recorded, not raised
