"""One process's whole run: config -> manifest -> its rows -> replica -> videos + result rows.

Every process runs this function. The main process also prepares the output folder, decides which
rows are still to do (resume), and once all processes are done, merges the results and writes the
dataset files and the report. Data flows one way; nothing here is shared between processes except
the output folder and the claim counter.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from batch_runner import dataset, memory, report
from batch_runner.cli import log_to_file
from batch_runner.cluster import Cluster, join_cluster
from batch_runner.config import RunConfig
from batch_runner.errors import UserError
from batch_runner.images import ImageLoadError, load_image
from batch_runner.manifest import Job, Manifest, load_manifest
from batch_runner.progress import Progress
from batch_runner.provenance import config_hash, output_salt, provenance, save_config
from batch_runner.replica import Replica, is_out_of_memory, release_memory
from batch_runner.results import ResultLog, finished_ids, merge
from batch_runner.sharding import StaticQueue, WorkQueue
from batch_runner.storage import sweep_temporaries
from batch_runner.video import write_video

log = logging.getLogger(__name__)

VIDEOS_DIR = "videos"
LOGS_DIR = "logs"
MAX_PENDING_WRITES = 2


def output_dir_of(cfg: RunConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser().resolve()
    return (Path("outputs") / Path(cfg.manifest).stem).resolve()


def run(cfg: RunConfig) -> int:
    """Run this process's part; returns the exit status."""
    cluster = join_cluster(cpu=not torch.cuda.is_available())
    try:
        return _run(cfg, cluster)
    finally:
        cluster.close()


def _run(cfg: RunConfig, cluster: Cluster) -> int:
    out = output_dir_of(cfg)
    manifest = load_manifest(cfg.manifest, cfg.model, cfg.seed, cfg.ids)
    if manifest.problems and cfg.on_invalid != "skip":
        raise UserError(_refusal(manifest))
    if cfg.on_invalid not in ("fail", "skip"):
        raise UserError(f"on_invalid={cfg.on_invalid!r} must be 'fail' or 'skip'.")
    if cfg.dry_run:
        if cluster.is_main:
            from batch_runner.dry_run import describe

            print(describe(cfg, manifest, cluster, out))
        return 0

    started = time.time()
    plan = cluster.broadcast(_prepare(cfg, manifest, out) if cluster.is_main else None)
    if not cluster.is_main:  # the terminal shows only its warnings (cli.setup_logging); all goes here
        log_to_file(out / LOGS_DIR / f"rank{cluster.rank:05d}.log")
    pending = [manifest.jobs[i] for i in plan["pending"]]
    log.info("%d rows to make, %d already done", len(pending), plan["done"])

    progress = Progress(cluster.counter, total=len(pending)) if cluster.is_main else None
    with logging_redirect_tqdm() if progress else contextlib.nullcontext():
        try:
            if pending:
                _make_videos(cfg, cluster, out, plan["run_id"], pending, progress)
        except BaseException:
            if progress:  # end the bar's line, so that the error is printed on a line of its own
                progress.bar.close()
            raise
        cluster.finish_and_wait(on_poll=progress.refresh if progress else None)
        if progress:
            progress.close()
    if not cluster.is_main:
        return 0
    table = merge(out, manifest)
    dataset.write_metadata(out, table, manifest)
    if cfg.output.format == "webdataset":
        dataset.write_shards(out, table, manifest, cfg.output.shard_size, rebuild=cfg.overwrite)
    elif cfg.output.format != "videofolder":
        raise UserError(f"output.format={cfg.output.format!r} must be videofolder or webdataset.")
    summary = report.write(out, table, manifest, started=started, run_id=plan["run_id"], html=cfg.output.report)
    print(report.summary_text(summary, out))
    # Failed rows are recorded, not fatal: the run itself succeeded (see the README's exit codes).
    return 0


def _refusal(manifest: Manifest) -> str:
    lines = "\n".join(f"  - {p}" for p in manifest.problems)
    rows = len({p.row for p in manifest.problems})
    return (
        f"The manifest {str(manifest.path)!r} has {rows} invalid row(s); nothing was run or written:\n{lines}\n"
        "Fix them, or pass on_invalid=skip to record them as failed and make the other rows."
    )


def _prepare(cfg: RunConfig, manifest: Manifest, out: Path) -> dict[str, Any]:
    """Main process only: set up the output folder and decide what is left to do."""
    out.mkdir(parents=True, exist_ok=True)
    (out / VIDEOS_DIR).mkdir(exist_ok=True)
    swept = sweep_temporaries(out)
    if swept:
        log.info("removed %d unfinished temporary file(s) left by an interrupted run", swept)
    save_config(cfg, out)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    done = set() if cfg.overwrite else finished_ids(out, manifest, output_salt(cfg))
    if manifest.problems:
        _record_invalid(cfg, manifest, out, run_id)
    pending = [i for i, job in enumerate(manifest.jobs) if job.id not in done]
    return {"run_id": run_id, "pending": pending, "done": len(done)}


def _record_invalid(cfg: RunConfig, manifest: Manifest, out: Path, run_id: str) -> None:
    results = ResultLog(out, run_id, rank=0)
    valid = {job.id for job in manifest.jobs}
    for row_id, reason in manifest.invalid_ids.items():
        log.warning("row %s skipped: %s", row_id, reason)
        if row_id in valid:
            # A row-number id (of a blank or repeated id) that a valid row uses as its own id: the record
            # would replace that row's own (and on a resume, turn its video into a failure). The refusal
            # is in the log above.
            continue
        results.append({"id": row_id, "status": "failed", "error": f"invalid row: {reason}", "finished_at": _now()})


def _make_videos(
    cfg: RunConfig, cluster: Cluster, out: Path, run_id: str, pending: list[Job], progress: Progress | None
) -> None:
    """Claim rows and make their videos until none are left."""
    replica = Replica(cfg, cluster.device, cluster.host_peers(), pending)
    results = ResultLog(out, run_id, cluster.rank)
    base = provenance(cfg, replica) | {"config_hash": config_hash(cfg)}
    salt = output_salt(cfg)
    if cfg.scheduling == "dynamic":
        queue = WorkQueue(cluster.counter, len(pending), cluster.world_size, cfg.chunk_size, key="claimed")
    elif cfg.scheduling == "static":
        queue = StaticQueue(len(pending), cluster.rank, cluster.world_size, cfg.chunk_size)
    else:
        raise UserError(f"scheduling={cfg.scheduling!r} must be 'dynamic' or 'static'.")
    on_step = progress.refresh if progress else None

    def finish(record: dict[str, Any]) -> None:
        record = base | record | {"rank": cluster.rank, "finished_at": _now()}
        results.append(record)
        cluster.counter.add("done", 1)
        level = logging.INFO if record["status"] == "ok" else logging.WARNING
        log.log(
            level,
            "row %s %s in %.1f s%s",
            record["id"],
            record["status"],
            record.get("seconds") or 0.0,
            f": {record['error']}" if record.get("error") else "",
        )

    with (
        ThreadPoolExecutor(1, thread_name_prefix="images") as loader,
        ThreadPoolExecutor(1, thread_name_prefix="videos") as writer,
    ):
        writes: list[Future] = []
        for chunk in queue:
            jobs = [pending[i] for i in chunk]
            images = [loader.submit(load_image, j.image, j.height, j.width, cfg.max_image_pixels) for j in jobs]
            prompts = replica.encode(jobs)
            for job, image in zip(jobs, images, strict=False):
                record = _row_record(job, salt, prompts.warnings.get(job.id)) | {"memory_plan": replica.plan}
                started = time.perf_counter()
                try:
                    frames = _make_one(replica, job, image.result(), prompts, record, on_step)
                except ImageLoadError as e:
                    finish(record | {"status": "failed", "error": f"image: {e}"})
                    continue
                except Exception as e:
                    release_memory()
                    finish(record | {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]})
                    continue
                record |= {"seconds": round(time.perf_counter() - started, 3), "peak_memory_gib": _peak_gib()}
                writes.append(writer.submit(_publish, out, job, frames, image.result(), record, cfg, finish))
                while len([w for w in writes if not w.done()]) > MAX_PENDING_WRITES:
                    writes[0].result()
                    writes = [w for w in writes if not w.done()]
                if progress:
                    progress.refresh()
        for w in writes:
            w.result()


def _make_one(replica: Replica, job: Job, image: Any, prompts: Any, record: dict, on_step: Any) -> Any:
    """Generate one row; on CUDA out-of-memory, step the replica down one plan and retry once."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        return replica.make(job, image, prompts, on_step)
    except Exception as e:
        if not (is_out_of_memory(e) and replica.cfg.memory.fallback_on_oom):
            raise
        before = replica.plan
        lower = replica.step_down()
        if lower is None:
            raise
        log.warning("row %s ran out of GPU memory under plan %s; retrying with %s", job.id, before, lower)
        record["memory_plan"] = lower
        record["warnings"] = _join(
            record.get("warnings"), f"out of GPU memory under plan {before}, redone with {lower}"
        )
        return replica.make(job, image, replica.encode([job]), on_step)


def _publish(out: Path, job: Job, frames: Any, image: Any, record: dict, cfg: RunConfig, finish: Any) -> None:
    """Writer thread: video first (atomically), then the preview, then the durable result row."""
    relative = f"{VIDEOS_DIR}/{job.id}.mp4"
    try:
        write_video(frames, out / relative, job.fps, cfg.output.crf)
    except Exception as e:
        finish(record | {"status": "failed", "error": f"writing video: {type(e).__name__}: {e}"})
        return
    if cfg.output.report:
        report.save_previews(out, job.id, frames, image)
    finish(record | {"status": "ok", "video_path": relative, "error": None})


def _row_record(job: Job, salt: str, warning: str | None) -> dict[str, Any]:
    return {
        "id": job.id,
        "seed": job.seed,
        "num_frames": job.num_frames,
        "height": job.height,
        "width": job.width,
        "fps": job.fps,
        "num_inference_steps": job.num_inference_steps,
        "guidance_scale": job.guidance_scale,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "image": job.image,
        "params_hash": job.params_hash(salt),
        "warnings": warning,
        "video_path": None,
        "seconds": None,
        "peak_memory_gib": None,
    }


def _join(first: str | None, second: str) -> str:
    return f"{first}; {second}" if first else second


def _peak_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / memory.GIB, 3)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
