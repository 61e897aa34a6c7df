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


@pytest.mark.slow
def test_two_launches_acting_as_two_hosts_make_every_row_once(tmp_path: Path) -> None:
    rows = [
        {"id": f"r{i}", "image": str(photo(tmp_path / "in" / f"{i}.png", seed=i)), "prompt": f"a boat number {i}"}
        for i in range(4)
    ]
    manifest = write_manifest(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    args = [f"manifest={manifest}", "model=tiny", f"output_dir={out}", "model.num_inference_steps=2", "chunk_size=1"]
    port = free_port()
    logs = [(tmp_path / f"host{r}.log").open("w") for r in (0, 1)]
    hosts = [
        subprocess.Popen(
            [*two_host_launch(r, port), str(ROOT / "run.py"), *args],
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
    # One process group of two: host 1's process is rank 1 of 2, not a second run of its own.
    assert "[rank 1/2]" in text[1] and "[rank 0/2]" in text[0]

    made = [
        json.loads(line)
        for part in sorted((out / "parts").glob("*.jsonl"))
        for line in part.read_text().splitlines()
        if line.strip()
    ]
    assert sorted(r["id"] for r in made) == sorted(r["id"] for r in rows), "every row made exactly once"
    assert len({part.name.split(".")[0] for part in (out / "parts").glob("*.jsonl")}) == 1, "one run, not two"
    table = pd.read_parquet(out / "results.parquet")
    assert sorted(table["id"]) == sorted(r["id"] for r in rows) and table["id"].is_unique
    assert (table["status"] == "ok").all(), table[["id", "status", "error"]]
    assert sorted(p.name for p in (out / "videos").glob("*.mp4")) == sorted(f"{r['id']}.mp4" for r in rows)
