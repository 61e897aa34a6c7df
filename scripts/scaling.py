"""Data-parallel scaling, end to end: the whole `accelerate launch` command on 1 and on N GPUs.

Per-step throughput scales almost perfectly (each process owns its GPU); what a short run loses is
start-up: imports, the process group, weights and compilation before each process's first
denoising step. So every measurement here times the command itself, from the moment it is launched
to its exit, over the same number of rows per GPU, and reads each process's start-up marks
(output_dir/logs/startup-rank<r>.json) to say where the time before the first step went.

    python scripts/scaling.py --gpus 1,2 --rows-per-gpu 4 --steps 10 --budgets none,8 --out $OUT
    # the same path on the CPU (tests/test_startup.py), with the tiny model
    python scripts/scaling.py --cpu --model tiny --overrides model.weights=tiny --photos examples/images

For each budget and GPU count: a cold run (a fresh compile cache, which it fills), then a warm one
(the same command again, as a rerun or the next job on the host). With --cache shared, one cache
serves all of them, so only the script's first command is cold: each process sees its own GPU as
cuda:0, so what one GPU compiled serves N. `efficiency` = throughput on N GPUs / (N x throughput
on 1), both whole commands, same budget and same cache state. Records go to
<out>/scaling.json, one per command, each naming the recipe `scaling-data-parallel`, the model,
`gpus` and `efficiency`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from batch_runner.run.launch import accelerate_launch, shown

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / ".device_inputs" / "examples" / "images"
PROMPTS = (
    "Gentle waves roll onto an empty beach at dusk, the sky slowly darkening as the tide foams.",
    "Three friends sit by a crackling campfire on a lakeshore under a full moon.",
    "Young friends chat and laugh outside a neon-lit shop on a city street at night.",
)
PHASES = ("interpreter", "imports", "process_group", "replica", "first_step")


def write_manifest(folder: Path, rows: int, photos: Path) -> Path:
    images = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    table = pd.DataFrame(
        {
            "id": [f"row{i:04d}" for i in range(rows)],
            "image": [str(images[i % len(images)]) for i in range(rows)],
            "prompt": [f"{PROMPTS[i % len(PROMPTS)]} Take {i}." for i in range(rows)],
        }
    )
    path = folder / f"jobs-{rows}.csv"
    table.to_csv(path, index=False)
    return path


# accelerate's launcher, started as its CLI or as its module (batch_runner.run.launch.accelerate_launch).
LAUNCHERS = {"accelerate": "accelerate launch", "module": "python -m accelerate.commands.launch"}


def startup_of(out: Path, launched: float) -> list[dict]:
    """Each process's marks, as seconds after the launch and seconds spent per phase."""
    ranks = []
    for path in sorted((out / "logs").glob("startup-rank*.json")):
        marks = json.loads(path.read_text())
        times = [("launch", launched), ("process_start", marks["process_start"])]
        times += [(phase, marks[phase]) for phase in PHASES if phase in marks]
        ranks.append(
            {
                "rank": marks["rank"],
                "launch_to_first_step_s": round(marks["first_step"] - launched, 2) if "first_step" in marks else None,
                "phases_s": {b[0]: round(b[1] - a[1], 2) for a, b in itertools.pairwise(times)},
            }
        )
    return ranks


def measure(
    model: str,
    gpus: int,
    rows: int,
    steps: int,
    budget: float | None,
    cache_dir: Path,
    cache: str,
    work: Path,
    extra: list[str],
    photos: Path = PHOTOS,
    cpu: bool = False,
    launcher: str = "accelerate",
) -> dict:
    manifest = write_manifest(work, rows, photos)
    out = work / f"out-{gpus}gpu-{'nobudget' if budget is None else f'{budget:g}gib'}-{cache}"
    overrides = [
        f"manifest={manifest}",
        f"model={model}",
        "model.weights=random",
        f"model.num_inference_steps={steps}",
        f"output_dir={out}",
        f"speed.compile_cache_dir={cache_dir}",
        "overwrite=true",
        "output.report=false",
        *([f"memory.budget_gib={budget:g}"] if budget is not None else []),
        *extra,
    ]
    command = [*accelerate_launch(gpus, cpu=cpu, cli=launcher == "accelerate"), str(ROOT / "run.py"), *overrides]
    launched = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - launched
    record = {
        "recipe": "scaling-data-parallel",
        "model": model,
        "gpus": gpus,
        "gpus_per_replica": 1,
        "rows": rows,
        "rows_per_gpu": rows // gpus,
        "steps": steps,
        "budget_gib": budget,
        "compile_cache": cache,
        "launcher": LAUNCHERS[launcher],
        "command": shown(
            [*command[: command.index(str(ROOT / "run.py"))], "run.py"]
            + [o for o in overrides if not o.startswith(("manifest=", "output_dir=", "speed.compile"))]
        ),
    }
    if done.returncode != 0:
        return record | {"error": f"exit {done.returncode}: {done.stderr[-1500:]}"}
    table = pd.read_parquet(out / "results.parquet")
    ok = table[table["status"] == "ok"]
    startup = startup_of(out, launched)
    firsts = [r["launch_to_first_step_s"] for r in startup if r["launch_to_first_step_s"] is not None]
    phases = {
        p: round(statistics.mean(r["phases_s"].get(p, 0.0) for r in startup), 2) for p in ("process_start", *PHASES)
    }
    return record | {
        "ok_rows": len(ok),
        "wall_seconds": round(wall, 1),
        "videos_per_hour": round(3600 * len(ok) / wall, 1),
        "launch_to_first_step_s": {"max": max(firsts), "mean": round(statistics.mean(firsts), 2)} if firsts else None,
        "phases_mean_s": phases,
        "per_rank": startup,
        "rows_per_rank": {int(k): int(v) for k, v in ok.groupby("rank").size().items()},
        "median_row_seconds": round(float(ok["seconds"].median()), 2),
        "memory_plan": sorted(set(ok["memory_plan"])),
        "gpu": ok["gpu"].iloc[0] if "gpu" in ok and len(ok) else None,
    }


def with_efficiency(records: list[dict]) -> list[dict]:
    """Throughput on N GPUs / (N x throughput on 1), for each N-GPU record against its 1-GPU twin."""
    for r in records:
        twin = next(
            (
                o
                for o in records
                if o["gpus"] == 1
                and all(o.get(k) == r.get(k) for k in ("budget_gib", "compile_cache", "gpu"))
                and o.get("launcher", "accelerate launch") == r.get("launcher", "accelerate launch")
            ),
            None,
        )
        fair = twin and "videos_per_hour" in r and "videos_per_hour" in twin
        r["efficiency"] = round(r["videos_per_hour"] / (r["gpus"] * twin["videos_per_hour"]), 3) if fair else None
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cogvideox-5b-i2v")
    parser.add_argument("--gpus", default="1,2", help="GPU counts to compare; 1 first")
    parser.add_argument("--rows-per-gpu", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budgets", default="none,8", help="none or GiB per process")
    parser.add_argument(
        "--cold",
        default="all",
        choices=("all", "none", "only"),
        help="all: a cold, then a warm run per GPU count; none: the first only warms the cache; only: cold runs",
    )
    parser.add_argument(
        "--cache",
        default="per-count",
        choices=("per-count", "shared"),
        help="per-count: a fresh compile cache per GPU count; shared: one for the whole script, which its "
        "first run fills (each process sees its GPU as cuda:0, so a cache warmed on 1 GPU is warm on N)",
    )
    parser.add_argument("--launcher", default="accelerate", choices=tuple(LAUNCHERS), help="accelerate's CLI or module")
    parser.add_argument("--deadline", type=float, default=560.0, help="start no run after this many seconds")
    parser.add_argument("--overrides", default="", help="extra Hydra overrides, space-separated")
    parser.add_argument("--photos", type=Path, default=PHOTOS, help="images the rows cycle through")
    parser.add_argument("--cpu", action="store_true", help="accelerate launch --cpu: a try of the script, no GPU")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    began = time.time()
    counts = [int(g) for g in args.gpus.split(",")]
    work = Path(tempfile.mkdtemp(prefix="batch_runner_scaling_"))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scaling.json"
    records = json.loads(path.read_text()) if path.exists() else []

    def run(gpus: int, budget: float | None, cache_dir: Path, cache: str) -> None:
        if time.time() - began > args.deadline:
            print(f"skipped {gpus} GPU(s), budget {budget}, {cache} cache: past the deadline", flush=True)
            return
        record = measure(
            args.model,
            gpus,
            gpus * args.rows_per_gpu,
            args.steps,
            budget,
            cache_dir,
            cache,
            work,
            args.overrides.split(),
            args.photos,
            args.cpu,
            args.launcher,
        )
        records.append(record)
        with_efficiency([r for r in records if r.get("model") == args.model])
        path.write_text(json.dumps(records, indent=2) + "\n")
        summary = {k: record.get(k) for k in ("gpus", "budget_gib", "compile_cache", "wall_seconds", "videos_per_hour")}
        print(
            json.dumps(
                summary
                | {
                    "efficiency": record.get("efficiency"),
                    "first_step": record.get("launch_to_first_step_s"),
                    "error": record.get("error"),
                }
            ),
            flush=True,
        )

    shared = Path(tempfile.mkdtemp(prefix="inductor_shared_", dir=work))
    filled = False  # the shared cache, once a command of this script ran with it
    for b in args.budgets.split(","):
        budget = None if b == "none" else float(b)
        for gpus in counts:
            if args.cache == "shared" and filled:
                run(gpus, budget, shared, "warm")
                continue
            if args.cache == "shared":
                cache_dir, filled = shared, True
            else:
                cache_dir = Path(tempfile.mkdtemp(prefix=f"inductor_{gpus}gpu_", dir=work))
            run(gpus, budget, cache_dir, "warming" if args.cold == "none" else "cold")
            if args.cold != "only":
                run(gpus, budget, cache_dir, "warm")
    env = {"python": sys.version.split()[0], "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
    print(json.dumps(env))


if __name__ == "__main__":
    main()
