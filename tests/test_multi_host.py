"""Several hosts: two launches on one machine acting as two hosts, and the SLURM script's commands.

The two-host run is real: two `accelerate launch --cpu --num_machines 2 --machine_rank R` commands,
one process each, meet at one address and port and share one manifest and output folder, as two
hosts on a shared filesystem do. The SLURM script is run with SLURM's variables set by the test
and fake `scontrol`/`srun`/`nvidia-smi` on PATH that print what they were asked, so the test
checks the exact `accelerate launch` command each node would run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, free_port, photo, write_manifest


def two_host_launch(machine_rank: int, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_machines",
        "2",
        "--machine_rank",
        str(machine_rank),
        "--num_processes",
        "2",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        "1",  # two "hosts" on one machine share its cores
    ]


def four_rows(tmp_path: Path) -> tuple[Path, list[dict]]:
    rows = [
        {"id": f"r{i}", "image": str(photo(tmp_path / "in" / f"{i}.png", seed=i)), "prompt": f"a boat number {i}"}
        for i in range(4)
    ]
    return write_manifest(tmp_path / "jobs.csv", rows), rows


FAST = ["model=tiny", "model.num_inference_steps=2", "chunk_size=1"]


def assert_one_run_made_every_row_once(out: Path, rows: list[dict]) -> None:
    made = [
        json.loads(line)
        for part in sorted((out / "parts").glob("*.jsonl"))
        for line in part.read_text().splitlines()
        if line.strip()
    ]
    assert sorted(r["id"] for r in made) == sorted(r["id"] for r in rows), "every row made exactly once"
    assert {r["rank"] for r in made} <= {0, 1}
    assert len({part.name.split(".")[0] for part in (out / "parts").glob("*.jsonl")}) == 1, "one run, not two"
    table = pd.read_parquet(out / "results.parquet")
    assert sorted(table["id"]) == sorted(r["id"] for r in rows) and table["id"].is_unique
    assert (table["status"] == "ok").all(), table[["id", "status", "error"]]
    assert sorted(p.name for p in (out / "videos").glob("*.mp4")) == sorted(f"{r['id']}.mp4" for r in rows)


@pytest.mark.slow
def test_two_launches_acting_as_two_hosts_make_every_row_once(tmp_path: Path) -> None:
    manifest, rows = four_rows(tmp_path)
    out = tmp_path / "out"
    port = free_port()
    logs = [(tmp_path / f"host{r}.log").open("w") for r in (0, 1)]
    hosts = [
        subprocess.Popen(
            [*two_host_launch(r, port), str(ROOT / "run.py"), f"manifest={manifest}", f"output_dir={out}", *FAST],
            cwd=tmp_path,
            stdout=logs[r],
            stderr=subprocess.STDOUT,
        )
        for r in (0, 1)
    ]
    try:
        codes = [h.wait(timeout=300) for h in hosts]
    finally:
        for h in hosts:
            if h.poll() is None:
                h.kill()
        for log in logs:
            log.close()
    text = [(tmp_path / f"host{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], "\n\n".join(t[-4000:] for t in text)
    # One process group of two: host 1's process is rank 1 of 2, not a second run of its own (it
    # logs below warnings to its file in output_dir, the main process to the terminal).
    assert "[rank 0/2]" in text[0]
    assert "[rank 1/2]" in (out / "logs" / "rank00001.log").read_text()
    assert_one_run_made_every_row_once(out, rows)


# --- the SLURM script -------------------------------------------------------------------------------

SBATCH = ROOT / "scripts" / "slurm" / "run.sbatch"


def fake_tools(folder: Path, accelerate: bool = True) -> Path:
    """`srun` that runs its command once per node of the fake allocation (as SLURM does with
    --ntasks-per-node=1: SLURM_NODEID set per task), `scontrol show hostnames` for gpu[07-08] and
    `scontrol show node` for gpu07 (NodeAddr 10.1.0.7, or an error with FAKE_NO_NODE set), and an
    `accelerate` that prints which node called it with which arguments instead of launching."""
    folder.mkdir(parents=True)
    tools = {
        "srun": f"""#!{sys.executable}
import json, os, subprocess, sys
options = [a for a in sys.argv[1:] if a.startswith("-")]
command = sys.argv[1 + len(options):]
print(json.dumps({{"srun": options}}), flush=True)
tasks = [subprocess.Popen(command, env=os.environ | {{"SLURM_NODEID": str(node), "SLURM_PROCID": str(node)}})
         for node in range(int(os.environ["SLURM_NNODES"]))]
sys.exit(max(task.wait() for task in tasks))
""",
        "scontrol": f"""#!{sys.executable}
import os, sys
if sys.argv[1:] == ["show", "node", "gpu07"] and os.environ.get("FAKE_NO_NODE"):
    sys.exit("slurm_load_node error: Invalid node name specified")
elif sys.argv[1:] == ["show", "node", "gpu07"]:  # gpu07 does not resolve: SLURM reaches it at its NodeAddr
    print("NodeName=gpu07 Arch=x86_64 CoresPerSocket=32")
    print("   NodeAddr=10.1.0.7 NodeHostName=gpu07 Version=22.05.8")
else:
    assert sys.argv[1:] == ["show", "hostnames", "gpu[07-08]"], sys.argv
    print("gpu07")
    print("gpu08")
""",
        "accelerate": f"""#!{sys.executable}
import json, os, sys
print(json.dumps({{"node": os.environ["SLURM_NODEID"], "cwd": os.getcwd(), "argv": sys.argv[1:]}}), flush=True)
""",
    }
    if not accelerate:
        del tools["accelerate"]
    for name, text in tools.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def run_sbatch(
    tmp_path: Path, *overrides: str, fake_accelerate: bool = True, timeout: int = 60, **env: str
) -> subprocess.CompletedProcess:
    """The script as sbatch runs it on a fake two-node allocation of job 1234, from `submitted`."""
    bin_dir = fake_tools(tmp_path / "bin", accelerate=fake_accelerate)
    submitted = tmp_path / "submitted"
    submitted.mkdir(exist_ok=True)
    slurm = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "SLURM_JOB_ID": "1234",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_GPUS_ON_NODE": "8",
    }
    return subprocess.run(
        ["bash", str(SBATCH), *overrides],
        cwd=submitted,
        env={k: v for k, v in (slurm | env).items() if v is not None},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launched(proc: subprocess.CompletedProcess) -> tuple[list[str], dict[str, list[str]]]:
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return lines[0]["srun"], {line["node"]: line["argv"] for line in lines[1:]}


def expected(rank: int, *overrides: str, device: tuple[str, ...] = ("--multi_gpu",), total: int = 16) -> list[str]:
    return [
        "launch",
        *device,
        *("--num_machines", "2", "--machine_rank", str(rank)),
        *("--main_process_ip", "10.1.0.7", "--main_process_port", "11234"),  # gpu07's NodeAddr; 10000 + 1234 % 20000
        *("--num_processes", str(total), "--mixed_precision", "no", "--dynamo_backend", "no"),
        str(ROOT / "run.py"),
        *overrides,
    ]


OVERRIDES = ("manifest=jobs.csv", "output_dir=/shared/out", "model.path=/models/My Model", "ids=[a,b]")


def test_sbatch_runs_one_accelerate_launch_per_node_with_its_rank(tmp_path: Path) -> None:
    proc = run_sbatch(tmp_path, *OVERRIDES)
    srun, commands = launched(proc)
    # Every node runs from the folder the job was submitted from, so relative paths mean the same.
    assert {json.loads(line).get("cwd") for line in proc.stdout.splitlines()[1:]} == {str(tmp_path / "submitted")}
    assert "--machine_rank 1 " in proc.stderr and "model.path=/models/My\\ Model" in proc.stderr  # logged, quoted
    assert srun == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert commands == {"0": expected(0, *OVERRIDES), "1": expected(1, *OVERRIDES)}


def test_sbatch_reads_gpus_from_the_allocation_and_takes_overrides(tmp_path: Path) -> None:
    # `--gpus-per-node h100:4` without SLURM_GPUS_ON_NODE; a port and main address given by the user.
    proc = run_sbatch(
        tmp_path, "manifest=j.csv", SLURM_GPUS_ON_NODE=None, SLURM_GPUS_PER_NODE="h100:4", MASTER_PORT="29999"
    )
    _, commands = launched(proc)
    want = [a.replace("11234", "29999") for a in expected(1, "manifest=j.csv", total=8)]
    assert commands["1"] == want
    # Only CUDA_VISIBLE_DEVICES (and a main address the user chose)
    proc = run_sbatch(
        tmp_path / "b",
        "manifest=j.csv",
        SLURM_GPUS_ON_NODE=None,
        CUDA_VISIBLE_DEVICES="0,1",
        MAIN_PROCESS_IP="10.0.0.7",
    )
    _, commands = launched(proc)
    assert commands["0"] == [a.replace("10.1.0.7", "10.0.0.7") for a in expected(0, "manifest=j.csv", total=4)]


def test_sbatch_meets_at_the_first_node_name_where_slurm_gives_no_node_addr(tmp_path: Path) -> None:
    _, commands = launched(run_sbatch(tmp_path, "manifest=j.csv", FAKE_NO_NODE="1"))
    assert commands["1"] == [a.replace("10.1.0.7", "gpu07") for a in expected(1, "manifest=j.csv")]


def test_sbatch_on_nodes_without_gpus_launches_on_the_cpu(tmp_path: Path) -> None:
    _, commands = launched(run_sbatch(tmp_path, "manifest=j.csv", SLURM_GPUS_ON_NODE="0"))
    assert commands["1"] == expected(1, "manifest=j.csv", device=("--cpu",), total=2)
    _, commands = launched(run_sbatch(tmp_path / "b", "manifest=j.csv", SLURM_GPUS_ON_NODE="0", PROCESSES_PER_NODE="3"))
    assert commands["0"] == expected(0, "manifest=j.csv", device=("--cpu",), total=6)


def test_sbatch_with_one_gpu_in_all_leaves_out_multi_gpu_which_refuses_one_process(tmp_path: Path) -> None:
    _, commands = launched(run_sbatch(tmp_path, "manifest=j.csv", SLURM_NNODES="1", SLURM_GPUS_ON_NODE="1"))
    want = expected(0, "manifest=j.csv", device=(), total=1)
    assert commands == {"0": [a if a != "2" else "1" for a in want]}  # --num_machines 1


def test_sbatch_outside_a_checkout_or_an_allocation_says_what_to_set(tmp_path: Path) -> None:
    proc = run_sbatch(tmp_path, "manifest=j.csv", SLURM_SUBMIT_DIR=str(tmp_path))
    assert proc.returncode == 2 and "BATCH_RUNNER_DIR" in proc.stderr and proc.stdout == ""
    node = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm" / "launch_node.sh"), "manifest=j.csv"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert node.returncode == 2 and node.stderr.startswith("error: SLURM_NNODES is not set")


@pytest.mark.slow
def test_the_sbatch_script_on_two_cpu_nodes_makes_every_row_once(tmp_path: Path) -> None:
    """The commands the script builds, really run: both "nodes" on this machine, without GPUs."""
    manifest, rows = four_rows(tmp_path)
    proc = run_sbatch(
        tmp_path,
        f"manifest=../{manifest.name}",  # relative to the folder the job was submitted from
        "output_dir=out",
        *FAST,
        fake_accelerate=False,
        timeout=300,
        ACCELERATE=f"{sys.executable} -m accelerate.commands.accelerate_cli",
        SLURM_GPUS_ON_NODE="0",
        MAIN_PROCESS_IP="127.0.0.1",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",  # two "nodes" on one machine share its cores
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "[rank 0/2]" in proc.stderr
    assert "[rank 1/2]" in (tmp_path / "submitted" / "out" / "logs" / "rank00001.log").read_text()
    assert_one_run_made_every_row_once(tmp_path / "submitted" / "out", rows)
