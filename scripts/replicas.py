"""Replicas of several GPUs against independent one-GPU replicas: latency and throughput, end to end.

Times the whole command line, `accelerate launch ... run.py`, on the same rows once per
`replica.gpus` value asked for (default 1 and every GPU of the host): with replica.gpus=1 each
GPU makes its own videos (throughput), with replica.gpus=k each video is split across k GPUs
(latency). Each run writes one record (appended to --out as a JSON line):

    gpus, gpus_per_replica, replicas     the launch
    wall_seconds                         the whole command, start-up (imports, weights, compile) included
    first_video_s                        launch to the first video recorded
    median_row_seconds                   median generation time of one video on its replica (latency)
    videos_per_hour                      rows / wall_seconds, start-up included
    videos_per_hour_steady               replicas * 3600 / median_row_seconds, once started

    # two H100s, Wan 2.2 TI2V-5B's architecture with random weights, 4 rows at its default size, 10 steps
    python scripts/replicas.py --gpus 2 --replica-gpus 1 2 --rows 4 --steps 10 --out replicas.jsonl
    # more overrides for every run after `--`
    python scripts/replicas.py --gpus 2 --replica-gpus 2 --out replicas.jsonl -- speed.compile=on
    # the same path on the CPU, with the tiny Wan model
    python scripts/replicas.py --cpu --gpus 4 --replica-gpus 1 2 --model tiny-wan --weights tiny --rows 4 --steps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from batch_runner.run.launch import accelerate_launch, shown

ROOT = Path(__file__).resolve().parent.parent


def manifest(folder: Path, rows: int) -> Path:
    """`rows` rows, each with its own image (smooth gradients and noise) and prompt."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(rows):
        y, x = np.mgrid[0:480, 0:832]
        rgb = np.stack([x * 255 / 832, y * 255 / 480, np.full_like(x, 40 * i % 255)], axis=-1)
        rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"{i}.png")
        records.append({"id": f"v{i}", "image": f"{i}.png", "prompt": f"a slow pan over scene {i}", "seed": i})
    path = folder / "jobs.csv"
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def run_once(args: argparse.Namespace, jobs: Path, k: int, out: Path) -> dict:
    command = [
        *accelerate_launch(args.gpus, cpu=args.cpu, port=args.port),
        str(ROOT / "run.py"),
        f"manifest={jobs}",
        f"output_dir={out}",
        f"model={args.model}",
        f"model.weights={args.weights}",
        f"model.num_inference_steps={args.steps}",
        f"replica.gpus={k}",
        *args.overrides,
    ]
    print("+", " ".join(command), flush=True)
    started = time.time()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode != 0:
        sys.exit(f"replica.gpus={k} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    table = pd.read_parquet(out / "results.parquet")
    made = table[table["status"] == "ok"]
    if len(made) != len(table):
        sys.exit(f"replica.gpus={k}: {len(table) - len(made)} row(s) failed: {table['error'].dropna().tolist()[:3]}")
    latency = statistics.median(made["seconds"])
    first = min(datetime.fromisoformat(t).timestamp() for t in made["finished_at"]) - started
    replicas = args.gpus // k
    return {
        "recipe": "scaling-replica",  # rendered with scripts/scaling.py's records in docs/benchmarks.md
        "model": args.model,
        "weights": args.weights,
        "gpu": "cpu" if args.cpu else torch.cuda.get_device_name(0),
        "gpus": args.gpus,
        "gpus_per_replica": k,
        "replicas": replicas,
        "rows": len(made),
        "steps": args.steps,
        "frames": int(made["num_frames"].iloc[0]),
        "height": int(made["height"].iloc[0]),
        "width": int(made["width"].iloc[0]),
        "wall_seconds": round(wall, 1),
        "first_video_s": round(first, 2),
        "median_row_seconds": round(latency, 2),  # one video on its replica: the latency
        "videos_per_hour": round(len(made) * 3600 / wall, 1),
        "videos_per_hour_steady": round(replicas * 3600 / latency, 2),
        "overrides": args.overrides,
        "command": shown(
            [*command[: command.index(str(ROOT / "run.py"))], "run.py"]
            + [o for o in command if o.startswith(("model", "replica", "speed"))]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=max(1, torch.cuda.device_count()), help="processes to launch")
    parser.add_argument("--replica-gpus", type=int, nargs="+", default=None, help="default: 1 and --gpus")
    parser.add_argument("--model", default="wan2.2-ti2v-5b")
    parser.add_argument("--weights", default="random", help="random (conf/arch, no download), tiny or pretrained")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu", action="store_true", help="accelerate launch --cpu (a try of the path, no GPU)")
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--out", type=Path, default=Path("replicas.jsonl"), help="JSON lines, appended")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args()
    sizes = args.replica_gpus or sorted({1, args.gpus})
    with tempfile.TemporaryDirectory(prefix="replicas-") as tmp:
        jobs = manifest(Path(tmp), args.rows)
        for k in sizes:
            record = run_once(args, jobs, k, Path(tmp) / f"out-k{k}")
            print(json.dumps(record), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
