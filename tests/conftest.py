"""Shared helpers: configs composed exactly as the command line composes them, and real inputs on disk.

Test lanes. `python -m pytest -q -m "not slow and not gpu"` is the development lane: in-process tests
only. A test that starts a process (`run_cli`, `subprocess`, a helper that calls them) is marked
`slow` here at collection, by reading what its code and its fixtures' code call, so nobody has to
remember the marker; and a test left unmarked that starts a process anyway (through a path the
reading missed) fails with a sentence saying so, so none can slip into the fast lane.
"""

from __future__ import annotations

import _posixsubprocess
import contextlib
import copy
import functools
import inspect
import multiprocessing
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hypothesis import settings
from omegaconf import OmegaConf
from PIL import Image

from batch_runner.config import RunConfig, register_configs
from batch_runner.run.launch import accelerate_launch
from batch_runner.run.overrides import with_family_options

ROOT = Path(__file__).resolve().parent.parent
register_configs()

# No time limit per example: hypothesis' default 200 ms fails a correct test as flaky where three
# workers and the processes they launch share two cores.
settings.register_profile("shared-cores", deadline=None)
settings.load_profile("shared-cores")


def run_config(*overrides: str) -> RunConfig:
    """The typed config `python run.py <overrides>` would run with: a copy of its own, so a test may
    change it, of the one composed once per test process for these overrides."""
    return copy.deepcopy(_composed(overrides))


@functools.cache
def _composed(overrides: tuple[str, ...]) -> RunConfig:
    """Hydra's composition, ~0.1 s a config: the same overrides compose the same config (conf/ and the
    registered schemas never change while the tests run), and the contract tests compose each model
    config for every family, so each is composed once."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=with_family_options(list(overrides)))  # as run.py hands them to Hydra
    return OmegaConf.to_object(cfg)


def photo(path: Path, size: tuple[int, int] = (120, 80), mode: str = "RGB", seed: int = 0) -> Path:
    """A real image file: smooth colour gradients plus noise, in the mode and format asked for."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        image.putalpha(Image.fromarray((x * 255 / w).astype(np.uint8)))
    elif mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_manifest(path: Path, rows: list[dict]) -> Path:
    table = pd.DataFrame(rows)
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False)
    return path


def run_cli(
    *args: str, cwd: Path = ROOT, launcher: list[str] | None = None, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """The command line as a user types it: `python run.py ...` or `accelerate launch ... run.py ...`."""
    command = [*(launcher or [sys.executable]), str(ROOT / "run.py"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def cli():
    """`run_cli`, as a fixture: a test that takes it is marked slow (as is one that calls run_cli)."""
    return run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cpu(processes: int, port: int | None = None) -> list[str]:
    """accelerate --cpu with a port of its own, so launches of parallel test sessions never meet."""
    return accelerate_launch(processes, cpu=True, port=port or free_port())


def assorted_photos(folder: Path) -> dict[str, Path]:
    """Assorted inputs: sizes, modes and formats as users bring them."""
    return {
        "rgb": photo(folder / "rgb.png", (120, 80)),
        "gray": photo(folder / "gray.jpg", (90, 140), "L", seed=1),
        "rgba": photo(folder / "rgba.png", (64, 64), "RGBA", seed=2),
        "webp": photo(folder / "wide.webp", (300, 100), seed=3),
        "jpeg": photo(folder / "photo.jpeg", (200, 150), seed=4),
        "palette": photo(folder / "pal.png", (100, 100), "P", seed=5),
    }


@pytest.fixture
def photos(tmp_path: Path) -> dict[str, Path]:
    return assorted_photos(tmp_path / "inputs")


def tiny_job(tmp_path, steps: int = 4):
    """A small guided row and its images (as Replica.make takes them), for the tiny pipeline."""
    from batch_runner.inputs.images import load_image
    from batch_runner.inputs.manifest import Job

    job = Job(
        index=0,
        id="x",
        image=str(photo(tmp_path / "in.png")),
        prompt="a sea at night",
        negative_prompt="",
        seed=3,
        num_frames=9,
        height=64,
        width=96,
        fps=8.0,
        num_inference_steps=steps,
        guidance_scale=6.0,
    )
    return job, {"image": load_image(job.image, job.height, job.width, 10**8), "last_image": None}


def loader_of_a_two_process_host():
    """Local rank 0 of a host whose other process (simulated in an in-memory store) wants every
    component and has mapped each one already: the loading process's whole path, in one process."""
    import json

    from torch.distributed import HashStore

    from batch_runner.cluster.cluster import HostPeers

    store = HashStore()
    store.set("host-weights/h/wants/1", json.dumps(["text_encoder", "transformer", "vae"]))
    for name in ("text_encoder", "transformer", "vae"):
        store.add(f"host-weights/h/{name}/done", 1)
    return HostPeers(0, 2, store, "h")


def ok(proc: subprocess.CompletedProcess) -> None:
    """The command succeeded; if not, show what it printed."""
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )


def assert_both_ranks_took_part(out: Path, ranks: set) -> None:
    """Both processes of a two-process run joined it and went to claim rows, and no row names any
    other rank. Which of them made rows is not asserted: under dynamic scheduling a process that
    builds its replica late on a busy machine may find every row claimed, as it should."""
    assert ranks <= {0, 1}, ranks
    log = (out / "logs" / "rank00001.log").read_text(errors="replace")  # rank 0's goes to the terminal
    assert "writing videos with up to" in log, log[-3000:]


def frames_of(path: Path) -> np.ndarray:
    from batch_runner.outputs.video import read_video

    return read_video(path)[0]


def same_video(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a rounding flip: float32 frames move by ~1e-6 with the thread count (two processes
    share the cores) and the weights' memory layout (after loading), which flips the rounding of a
    few uint8 values; a wrong input, weight or seed moves them by tens of levels."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 2


def made_by_one_process_and_by_two(
    tmp_path: Path, manifest: Path, *overrides: str, one_launched: bool = False
) -> tuple[pd.DataFrame, dict]:
    """Every row of the manifest made by one process, then by two (accelerate --cpu), each run making
    every row once; placement must not change a video. Returns the one-process results and frames.

    The one process is this test's own (the runner called as run.py calls it, from the same folder),
    or with `one_launched` a `python run.py` launched as a user types it: a launch costs ~7 CPU-s of
    imports and start-up, and `python run.py` itself is run end to end by tests/test_cli.py; the two
    processes are always launched as a user launches them."""
    from batch_runner.run import runner

    made = {}
    for run, launcher in (("single", [sys.executable] if one_launched else None), ("double", accelerate_cpu(2))):
        out = tmp_path / run
        if launcher is None:
            with contextlib.chdir(tmp_path):
                assert runner.run(run_config(f"manifest={manifest}", *overrides, f"output_dir={out}")) == 0
        else:
            ok(run_cli(f"manifest={manifest}", *overrides, f"output_dir={out}", launcher=launcher, cwd=tmp_path))
        table = pd.read_parquet(out / "results.parquet").set_index("id")
        assert set(table["status"]) == {"ok"} and set(table["rank"]) <= {0, 1}, run
        made[run] = table, {i: frames_of(out / "videos" / f"{i}.mp4") for i in table.index}
    (table, frames), (_, twos) = made["single"], made["double"]
    assert sorted(twos) == sorted(frames) == sorted(pd.read_csv(manifest)["id"])
    for i in frames:
        assert same_video(twos[i], frames[i]), i
    return table, frames


def made_from_a_saved_folder(tmp_path: Path, manifest: Path, model: str, row: str, edit=None) -> tuple:
    """One row made by the tiny pipeline built in code, and by the same pipeline saved with
    `save_pretrained` and loaded as a user's folder through model.path (`edit`: changes the saved
    folder first, as a Hub checkpoint differs). Returns the two videos' frames."""
    from batch_runner.replica.pipeline import build_pipeline

    folder = tmp_path / "saved"
    build_pipeline(run_config("manifest=x", f"model={model}").model).save_pretrained(folder)
    if edit is not None:
        edit(folder)
    made = []
    for source in ("tiny", "pretrained"):
        out = tmp_path / source
        extra = [f"model.path={folder}"] if source == "pretrained" else []
        overrides = [f"model={model}", f"model.weights={source}", *extra, f"ids=[{row}]", "output.crf=0"]
        ok(run_cli(f"manifest={manifest}", *overrides, f"output_dir={out}", cwd=tmp_path))
        made.append(frames_of(out / "videos" / f"{row}.mp4"))
    return tuple(made)


# --- test lanes --------------------------------------------------------------------------------------------

# What starts a process when called. A test reaching one of these (directly, through a helper defined in
# tests/, or through a fixture) is marked slow.
_SPAWNING_OBJECTS = (run_cli, subprocess.run, subprocess.Popen, subprocess.call, subprocess.check_call)
_SPAWNING_OBJECTS += (subprocess.check_output, os.system, os.fork, os.popen)
_SPAWNING_MODULES = (subprocess, multiprocessing)
_SPAWNING_OS_NAMES = {"system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "spawnv", "spawnl"}
_SPAWNING_OS_NAMES |= {"execv", "execve", "execvp", "execvpe", "execl", "execlp"}


def _names(code: types.CodeType) -> set[str]:
    """Every global or attribute name a function's code (its nested functions and comprehensions too) uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _starts_processes(func, seen: set[int]) -> bool:
    """Whether calling `func` may start a process: it uses a spawning name, or calls a tests/ helper that does."""
    func = inspect.unwrap(getattr(func, "__func__", func))
    code = getattr(func, "__code__", None)
    if code is None or id(code) in seen:
        return False
    seen.add(id(code))
    names = _names(code)
    scope = getattr(func, "__globals__", {})
    for name in names:
        if name not in scope:
            continue
        obj = scope[name]
        if obj is os and names & _SPAWNING_OS_NAMES:
            return True
        if any(obj is spawner for spawner in _SPAWNING_MODULES + _SPAWNING_OBJECTS):
            return True
        if isinstance(obj, types.ModuleType) and obj.__name__.startswith("tests"):
            # `conftest.run_cli`, `test_faults.good_rows`: the attribute names used are in `names` too.
            helpers = [getattr(obj, n) for n in names if inspect.isfunction(getattr(obj, n, None))]
            if any(_starts_processes(helper, seen) for helper in helpers):
                return True
            continue
        if inspect.isfunction(obj) and obj.__module__.startswith("tests") and _starts_processes(obj, seen):
            return True
    return False


def _item_starts_processes(item: pytest.Item) -> bool:
    if _starts_processes(getattr(item, "function", None), set()):
        return True
    fixtures = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        if name == "_processes_only_in_the_slow_lane":  # the guard names what it refuses; it starts nothing
            continue
        for definition in fixtures.name2fixturedefs.get(name, ()) if fixtures else ():
            if _starts_processes(definition.func, set()):
                return True
    return False


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark slow every test that starts a process: the fast lane (`-m "not slow"`) never runs one."""
    for item in items:
        if item.get_closest_marker("slow") is None and _item_starts_processes(item):
            item.add_marker(pytest.mark.slow)


class StartedAProcess(AssertionError):
    """An unmarked test started a process: it would slow the fast lane."""


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise StartedAProcess(
            f"this test started a process ({what}) but is not marked slow: start it with tests.conftest.run_cli "
            "or the `cli` fixture (which mark it automatically), or mark the test @pytest.mark.slow"
        )

    return refused


@pytest.fixture(autouse=True)
def _processes_only_in_the_slow_lane(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """In a test not marked slow (or gpu), starting any process fails the test with a sentence saying why."""
    if request.node.get_closest_marker("slow") or request.node.get_closest_marker("gpu"):
        yield
        return
    # subprocess (and multiprocessing's spawn) go through fork_exec; the rest are os's own ways.
    monkeypatch.setattr(_posixsubprocess, "fork_exec", _refuse("a child process"))
    if getattr(subprocess, "_fork_exec", None) is not None:  # subprocess binds its own name at import
        monkeypatch.setattr(subprocess, "_fork_exec", _refuse("subprocess"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "execv", "execve"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse(f"os.{name}"))
    yield


@pytest.fixture(autouse=True)
def uncapped_gpu_after_each_test(request: pytest.FixtureRequest):
    """A budgeted replica caps this process's CUDA allocator for the rest of its life (a run has one
    replica, so the cap never needs lifting). In one test process the cap would outlive its test and
    size the next tests' references and replicas: lift it after every GPU test."""
    yield
    if request.node.get_closest_marker("gpu"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(1.0)
