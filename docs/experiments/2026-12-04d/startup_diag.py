"""Start-up on the device, phase by phase: one cold-ish run (2 rows) then one-row warm runs under
variants of inductor's compile workers, with what else runs on the host before each."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT / "scripts"))
import benchmark as b  # noqa: E402

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
target = b.Target.of("wan2.1-i2v-14b-480p-lightx2v")
work = Path(tempfile.mkdtemp(prefix="diag_"))
photos = sorted(Path("/tmp/images").glob("*.png"))


def manifest(name: str, rows: int) -> Path:
    lines = ["id,image,prompt"] + [f'{name}{i},{photos[i % len(photos)]},"{b.PROMPT} Take {i}."' for i in range(rows)]
    path = work / f"{name}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(label: str, rows: int, env: dict, importtime: bool = False) -> None:
    top = subprocess.run(
        "cat /proc/loadavg; ps -eo pid,pcpu,etimes,comm --sort=-pcpu | head -6",
        shell=True,
        capture_output=True,
        text=True,
    ).stdout
    print(f"DIAG {label} before: " + " | ".join(top.strip().splitlines()), flush=True)
    command = [
        sys.executable,
        *(["-X", "importtime"] if importtime else []),
        str(ROOT / "run.py"),
        f"manifest={manifest(label, rows)}",
        f"model={target.model}",
        f"model.weights={target.config.weights}",
        f"model.num_inference_steps={target.steps}",
        *b.lora_overrides(target.config),
        f"output_dir={work / label}",
        "overwrite=true",
        "output.report=false",
    ]
    started = time.time()
    with open(out / f"{label}.stderr", "w") as err:
        subprocess.run(command, cwd=ROOT, env=os.environ | env, stderr=err, stdout=subprocess.DEVNULL, check=False)
    wall = time.time() - started
    try:
        marks = b.startup_seconds(work / label, started)
    except FileNotFoundError:
        marks = {}
    import pandas as pd

    try:
        table = pd.read_parquet(work / label / "results.parquet")
        stages = {c: round(float(table[c].iloc[0]), 2) for c in b.STAGE_COLUMNS if c in table}
    except Exception as e:
        stages = {"error": str(e)[:200]}
    print(f"DIAG {label} env={env} wall={wall:.1f} marks={json.dumps(marks)} row0={json.dumps(stages)}", flush=True)


run("cold", 2, {})
run("warm_default", 1, {})
run("warm_pool1", 1, {"TORCH_WARM_POOL": "1"})
run("warm_threads1", 1, {"TORCHINDUCTOR_COMPILE_THREADS": "1"})
run("warm_default2", 1, {}, importtime=True)
