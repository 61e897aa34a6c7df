"""`dry_run=true`: what a run would do, in seconds, with no model loaded and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from batch_runner.cluster.cluster import Cluster
from batch_runner.cluster.sharding import static_shard
from batch_runner.config import RunConfig
from batch_runner.inputs.manifest import Job, Manifest
from batch_runner.outputs.provenance import output_salt
from batch_runner.outputs.results import finished_ids
from batch_runner.replica.planner import RowPlans, gpu_budget_gib, plan_rows

BENCHMARKS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.json"
# The first records, from before records named their model, are all CogVideoX-5B-I2V's.
FIRST_BENCHMARKED_MODEL = "cogvideox-5b-i2v"
BENCHMARKED_FRAMES = 49  # theirs, at CogVideoX-5B-I2V's default row; later records say their own


def describe(cfg: RunConfig, manifest: Manifest, cluster: Cluster, out: Path) -> str:
    done = set() if cfg.overwrite or not out.exists() else finished_ids(out, manifest, output_salt(cfg))
    pending = [job for job in manifest.jobs if job.id not in done]
    world = cluster.world_size
    gpus = max(1, cfg.replica.gpus)
    replicas = max(1, world // gpus)
    lines = [
        f"manifest {manifest.path}: {len(manifest.table)} rows, {len(manifest.jobs)} valid, "
        f"{len(manifest.problems)} problem(s)"
        + (" (recorded as failed: on_invalid=skip)" if manifest.problems else ""),
        *(f"  - {p}" for p in manifest.problems[:20]),
        f"output_dir {out}: {len(done)} rows already done, {len(pending)} to make",
        f"{world} process(es)"
        + (f" in {replicas} replica(s) of {gpus} GPUs ({cfg.replica.attention} attention)" if gpus > 1 else "")
        + "; rows are claimed "
        + ("dynamically in chunks of up to " + str(cfg.chunk_size) if cfg.scheduling == "dynamic" else "statically"),
    ]
    for index in range(replicas):
        share = static_shard(len(pending), index, replicas)
        ids = [pending[i].id for i in share]
        preview = ", ".join(ids[:4]) + (" ..." if len(ids) > 4 else "")
        who = (
            f"process {index}" if gpus == 1 else f"replica {index} (processes {index * gpus}-{index * gpus + gpus - 1})"
        )
        lines.append(f"  {who}: ~{len(share)} rows" + (f" ({preview})" if ids else ""))
    plans, why, budget = _plan(cfg, cluster, pending)
    if plans is None or (len(plans.placements) == 1 and not plans.misfits):
        lines.append(f"memory plan: {why}")
    else:
        lines.append("memory plans, one per row shape (rows of one plan run together):")
        lines.extend(f"  {line}" for line in plans.lines())
    local_gpu = torch.cuda.get_device_name(cluster.device) if cluster.device.type == "cuda" else None
    estimate = _estimate_seconds(cfg, plans, budget, pending, local_gpu)
    if estimate is not None:
        seconds, gpu = estimate
        lines.append(
            f"estimated time: ~{_duration(seconds / max(1, world))} with {world} process(es) "
            f"(~{seconds / max(1, len(pending)):.0f} s per video on an {gpu}, from docs/benchmarks.json)"
        )
    else:
        lines.append("estimated time: no benchmark figure for this model and plan (docs/benchmarks.json)")
    lines.append("dry run: no model loaded, nothing written.")
    return "\n".join(lines)


def _plan(cfg: RunConfig, cluster: Cluster, pending: list[Job]) -> tuple[RowPlans | None, str, float | None]:
    """The placement of every row shape, the sentence for a single one, and the GPU budget."""
    config = cfg.memory
    if not torch.cuda.is_available() and config.budget_gib is None:
        return None, "none (no GPU found and no memory.budget_gib given: a GPU run would choose then)", None
    budget = config.budget_gib if config.budget_gib is not None else gpu_budget_gib(config, cluster.device)
    plans = plan_rows(cfg, budget, cluster.local_world_size, pending)
    if config.plan != "auto" and len(plans.placements) == 1:
        return plans, f"{config.plan} (set in the config)", budget
    return plans, plans.placements[0].reason, budget


def _estimate_seconds(
    cfg: RunConfig, plans: RowPlans | None, budget: float | None, pending: list[Job], local_gpu: str | None
) -> tuple[float, str] | None:
    """Seconds for `pending`, and the GPU they were measured on: the benchmark's measured step and
    outside-the-steps times, each row under its own shape's plan.

    One card's records make the estimate: this machine's where it has some, else the card of the
    newest record of the model (cards differ by a third on some models, so they are not mixed). Of
    a plan's records the one at the budget nearest this run's is taken, the newest of equals (the
    records of later code). The benchmark runs each model at its default row; steps scale with a
    row's step count, and both parts roughly with its frame count.
    """
    if not BENCHMARKS.exists():
        return None
    records = [
        r
        for r in json.loads(BENCHMARKS.read_text())
        if r.get("model", FIRST_BENCHMARKED_MODEL) == cfg.model.name
        and not r.get("changes_output")
        and not r.get("allocator_env")  # measured under allocator settings a run does not have
        and r.get("seconds_per_step")
        and r.get("plan")
    ]
    if not records:
        return None
    cards = {r["gpu"] for r in records}
    gpu = local_gpu if local_gpu in cards else records[-1]["gpu"]
    records = [r for r in records if r["gpu"] == gpu]
    total = 0.0
    for job in pending:
        if plans is not None and plans.misfit(job):
            continue  # recorded as failed, not made (on_invalid=skip)
        plan = plans.for_job(job).plan if plans is not None else "none"
        of_plan = [r for r in records if r["plan"] == plan]
        if not of_plan:
            return None
        best = min(reversed(of_plan), key=lambda r: abs((r.get("budget_gib") or 80) - (budget or 80)))
        step, outside = best["seconds_per_step"], best["seconds_outside_steps"]
        frames = best.get("frames", BENCHMARKED_FRAMES)  # the row the benchmark made, not today's default
        total += (outside + step * job.num_inference_steps) * job.num_frames / frames
    return total, gpu


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
