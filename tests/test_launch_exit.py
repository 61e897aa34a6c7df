"""Under `accelerate launch`, a refused setting or row ends the launch with exit 2 and one sentence.

accelerate's launcher would turn the run's status 2 into a traceback and status 1 in its own process;
batch_runner.run.accelerate_exit (a torch.backends entry point, so installed with the package) keeps
the 2 there and drops the traceback. The launch test needs the package installed as pyproject.toml
declares it (`pip install -e .`).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from subprocess import CalledProcessError

import pytest

from batch_runner.run.accelerate_exit import child_refused, launches_run_py
from tests.conftest import ROOT, accelerate_cpu, photo, run_cli, write_manifest

RUN_PY = str(ROOT / "run.py")


@pytest.mark.parametrize(
    "argv",
    [
        ["/usr/bin/accelerate", "launch", "--cpu", "--num_processes", "2", RUN_PY, "manifest=x"],
        ["python", "-m", "accelerate.commands.launch", "--multi_gpu", RUN_PY],
        ["/venv/bin/accelerate-launch", RUN_PY, "seed=3"],
    ],
)
def test_the_exit_hook_acts_in_accelerates_launcher_of_run_py(argv):
    assert launches_run_py(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["python", RUN_PY, "manifest=x"],  # the run itself, or a torchrun worker of it
        ["accelerate", "launch", "train.py"],  # someone else's script
        ["accelerate", "launch", "/elsewhere/run.py"],  # a run.py with no batch_runner next to it
        ["accelerate", "config"],
        ["python", "-c", "import torch"],
    ],
)
def test_the_exit_hook_leaves_every_other_process_alone(argv):
    assert not launches_run_py(argv)


def test_only_a_refusal_of_the_run_becomes_a_quiet_exit_2():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    assert child_refused(CalledProcessError(2, ["python", "run.py"]))
    assert not child_refused(CalledProcessError(1, ["python", "run.py"]))
    assert not child_refused(CalledProcessError(137, ["python", "run.py"]))
    assert not child_refused(RuntimeError("anything else"))

    def failed(code: int) -> ChildFailedError:
        failure = ProcessFailure(local_rank=0, pid=1, exitcode=code, error_file="/nonexistent")
        return ChildFailedError("run.py", {0: failure})

    assert child_refused(failed(2)) and not child_refused(failed(1))


def test_a_bad_setting_and_a_bad_row_end_accelerate_launch_with_exit_2_and_one_sentence(tmp_path: Path) -> None:
    installed = [ep.value for ep in entry_points(group="torch.backends")]
    assert "batch_runner.run.accelerate_exit:install" in installed, (
        "this environment's batch_runner was installed before its torch.backends entry point: pip install -e ."
    )
    rows = [
        {"id": "a", "image": str(photo(tmp_path / "a.png")), "prompt": "a boat"},
        {"id": "b", "image": str(tmp_path / "missing.png"), "prompt": "a tree"},
    ]
    manifest = write_manifest(tmp_path / "jobs.csv", rows)
    good = write_manifest(tmp_path / "good.csv", rows[:1])
    cases = {
        "model.num_inference_steps=0": (f"manifest={good}", "model.num_inference_steps=0"),
        "row 2 (id 'b'), column 'image'": (f"manifest={manifest}",),
    }
    for said, args in cases.items():
        out = tmp_path / "out"
        proc = run_cli(*args, "model=tiny", f"output_dir={out}", launcher=accelerate_cpu(2), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, proc.stderr[-3000:]
        assert said in proc.stderr
        assert not out.exists()


def test_the_launching_process_refuses_what_its_processes_would(tmp_path: Path) -> None:
    from batch_runner.errors import UserError
    from batch_runner.run.preflight import preflight

    conf = ROOT / "conf"
    good = write_manifest(tmp_path / "good.csv", [{"id": "a", "image": str(photo(tmp_path / "a.png")), "prompt": "x"}])
    preflight([f"manifest={good}", "model=tiny"], conf, world_size=2)  # nothing to refuse
    bad = write_manifest(tmp_path / "bad.csv", [{"id": "a", "image": str(tmp_path / "gone.png"), "prompt": "x"}])
    with pytest.raises(UserError, match=r"row 1 \(id 'a'\), column 'image'"):
        preflight([f"manifest={bad}", "model=tiny"], conf, world_size=2)
    with pytest.raises(UserError, match=r"replica.gpus=2 does not divide the 3 process\(es\) started"):
        preflight([f"manifest={good}", "model=tiny", "replica.gpus=2"], conf, world_size=3)
    # Hydra's own options are left to the run (the option's value reads as no override).
    preflight(["--config-name", "config", f"manifest={good}"], conf, world_size=2)
    # An output_dir that is a file or someone's folder (the processes refused it after their start-up).
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(UserError, match=r"output_dir '.*a-file' is a file, not a folder"):
        preflight([f"manifest={good}", "model=tiny", f"output_dir={tmp_path / 'a-file'}"], conf, world_size=2)
    (tmp_path / "project" / "src").mkdir(parents=True)
    with pytest.raises(UserError, match=r"already holds files batch_runner did not write \('src'\)"):
        preflight([f"manifest={good}", "model=tiny", f"output_dir={tmp_path / 'project'}"], conf, world_size=2)
    assert (tmp_path / "a-file").read_text() == "mine" and [p.name for p in (tmp_path / "project").iterdir()] == ["src"]
    with pytest.raises(UserError, match=r"model.path='.*a-file' is not a folder; point it at a downloaded copy"):
        local = ["model.weights=pretrained", f"model.path={tmp_path / 'a-file'}"]
        preflight([f"manifest={good}", "model=tiny", *local], conf, world_size=2)
