"""Host memory of a multi-GPU run, with and without one shared host copy of the weights.

Saves CogVideoX-5B-I2V's architecture with random weights as a diffusers folder (what users load
with model.path), then runs the command line under `accelerate launch` on every GPU of this host,
with memory.share_host_weights on and off, for a resident plan and a streamed one. While each run
goes, the host's used memory (MemTotal - MemAvailable, so the page cache of the weight files is
not counted) is sampled; the record keeps the peak above the level before the run and the level
while the videos are made.

    python scripts/host_memory.py --out docs/experiments/host_sharing.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 1024**3


def meminfo() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            values[key] = int(rest.split()[0]) * 1024
    return values


def used_bytes() -> int:
    info = meminfo()
    return info["MemTotal"] - info["MemAvailable"]


class Sampler(threading.Thread):
    """Host memory in use, every `interval` seconds, until stopped."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (unix time, used, shmem)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            info = meminfo()
            self.samples.append((time.time(), info["MemTotal"] - info["MemAvailable"], info["Shmem"]))
            time.sleep(self.interval)


def save_random_pipeline(folder: Path) -> float:
    """The real architecture with random weights, saved as a diffusers pipeline folder; returns GiB."""
    from batch_runner.config import ModelConfig
    from batch_runner.replica.pipeline import build_pipeline

    model = ModelConfig(name="cogvideox-5b-i2v", family="cogvideox", weights="random", arch="cogvideox-5b-i2v")
    pipe = build_pipeline(model, "cuda").to("cpu")
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    torch.cuda.empty_cache()
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / GIB


def run_once(folder: Path, work: Path, processes: int, rows: int, steps: int, plan: str, share: bool) -> dict:
    label = f"{plan}-{'shared' if share else 'private'}"
    out = work / label
    photos = sorted((ROOT / ".device_inputs" / "examples" / "images").glob("*.png"))
    manifest = work / f"{label}.csv"
    pd.DataFrame(
        {"id": [f"r{i}" for i in range(rows)], "image": [str(photos[i % len(photos)]) for i in range(rows)]}
        | {"prompt": ["Waves roll onto a beach at dusk."] * rows}
    ).to_csv(manifest, index=False)
    memory = ["memory=none"] if plan == "none" else [f"memory={plan}", "memory.budget_gib=8"]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        f"--num_processes={processes}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        str(ROOT / "run.py"),
        f"manifest={manifest}",
        "model.weights=pretrained",
        f"model.path={folder}",
        f"model.num_inference_steps={steps}",
        "speed.compile=off",
        f"memory.share_host_weights={str(share).lower()}",
        f"output_dir={out}",
        *memory,
    ]
    before = used_bytes()
    sampler = Sampler()
    sampler.start()
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.monotonic() - started
    sampler.stopped.set()
    sampler.join()
    record = {
        "experiment": "host-memory",
        "plan": plan,
        "share_host_weights": share,
        "processes": processes,
        "rows": rows,
        "steps": steps,
        "returncode": proc.returncode,
        "wall_seconds": round(wall, 1),
        "host_used_before_gib": round(before / GIB, 2),
        "command": " ".join(command[2:]),
    }
    if proc.returncode != 0:
        record["stderr_tail"] = proc.stderr[-3000:]
        return record
    table = pd.read_parquet(out / "results.parquet")
    finished = pd.to_datetime(table["finished_at"], utc=True).astype("int64") / 1e9
    # While videos are made: from the first video's end to the last's.
    making = [u - before for t, u, _ in sampler.samples if finished.min() <= t <= finished.max()]
    used = [u - before for _, u, _ in sampler.samples]
    making = making or used
    record |= {
        "status": sorted(set(table["status"])),
        "memory_plan": sorted(set(table["memory_plan"])),
        "peak_host_above_before_gib": round(max(used) / GIB, 2),
        "host_while_making_gib": round(sorted(making)[len(making) // 2] / GIB, 2),
        "peak_shmem_gib": round(max(s for _, _, s in sampler.samples) / GIB, 2),
        "seconds_per_video_median": round(float(table["seconds"].median()), 2),
        "seconds_per_video_by_rank": {
            int(r): round(float(g["seconds"].median()), 2) for r, g in table.groupby("rank", sort=True)
        },
        "shared_lines": [
            line[line.index("batch_runner.") :] for line in proc.stderr.splitlines() if "host_weights" in line
        ],
        "plan_lines": [line[line.index("memory plan") :] for line in proc.stderr.splitlines() if "memory plan" in line],
    }
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "experiments" / "host_sharing.json")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "cogvideox-5b-i2v-random")
    parser.add_argument("--plans", default="none,group_offload")
    parser.add_argument("--rows-per-process", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    processes = torch.cuda.device_count()
    records = []
    if not (args.model_dir / "model_index.json").exists():
        started = time.monotonic()
        gib = save_random_pipeline(args.model_dir)
        records.append(
            {"experiment": "saved-folder", "gib": round(gib, 2), "seconds": round(time.monotonic() - started, 1)}
        )
    environment = {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": processes,
        "host_memory_gib": round(meminfo()["MemTotal"] / GIB, 1),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    records.append({"experiment": "environment"} | environment)
    with tempfile.TemporaryDirectory() as work:
        # Shared first, then private, so the page cache holds the files for both the same way.
        for plan in args.plans.split(","):
            for share in (True, False):
                record = run_once(
                    args.model_dir, Path(work), processes, processes * args.rows_per_process, args.steps, plan, share
                )
                print(json.dumps({k: v for k, v in record.items() if k not in ("shared_lines", "command")}), flush=True)
                records.append(record)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(records, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
