"""One process's whole run: config -> manifest -> its rows -> replica -> videos + result rows.

Every process runs this function. The main process also prepares the output folder, decides which
rows are still to do (resume), and once all processes are done, merges the results and writes the
dataset files and the report. Data flows one way; nothing here is shared between processes except
the output folder and the claim counter.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from batch_runner.cluster.cluster import Cluster, join_cluster
from batch_runner.cluster.parallel import form_team
from batch_runner.cluster.sharding import Claims, StaticQueue
from batch_runner.config import RunConfig
from batch_runner.errors import UserError
from batch_runner.inputs.images import ImageLoadError, load_image
from batch_runner.inputs.manifest import Job, Manifest, load_manifest
from batch_runner.outputs import dataset, report
from batch_runner.outputs.provenance import config_hash, output_salt, provenance, run_key, save_config
from batch_runner.outputs.quality import measure
from batch_runner.outputs.results import ResultLog, ResultRow, finished_ids, merge
from batch_runner.outputs.storage import (
    TEMP_SUFFIX,
    OutputError,
    OutputLock,
    check_output_dir,
    fsync_dir,
    mark_output_dir,
    output_errors,
    sweep_temporaries,
)
from batch_runner.outputs.video import Audio, write_video
from batch_runner.outputs.writers import Writers, encoder_count
from batch_runner.replica import compile_cache
from batch_runner.replica.planner import GIB
from batch_runner.replica.replica import BadFrames, Replica, is_out_of_memory, out_of_memory_summary, release_memory
from batch_runner.replica.speed import should_compile
from batch_runner.run import lifecycle, startup
from batch_runner.run.checks import check_replica_rows, check_settings
from batch_runner.run.logs import log_to_file
from batch_runner.run.progress import Progress
from batch_runner.run.replay import replayed

log = logging.getLogger(__name__)

VIDEOS_DIR = "videos"
LOGS_DIR = "logs"
# What a run that cannot write its output folder keeps, in the sentence that ends it.
KEPT_WHILE_MAKING = (
    "every row finished so far is kept (its video and its line under parts/), and a rerun makes only the others"
)
KEPT_AT_END = (
    "every video made and its line under parts/ are kept, and a rerun writes results.parquet, "
    "metadata.parquet and the report without making them again"
)


def output_dir_of(cfg: RunConfig) -> Path:
    """The output folder, absolute (realpath: a link loop is left for the folder's checks to name)."""
    if cfg.output_dir:
        return Path(os.path.realpath(Path(cfg.output_dir).expanduser()))
    return Path(os.path.realpath(Path("outputs") / Path(cfg.manifest).stem))


def run(cfg: RunConfig) -> int:
    """Run this process's part; returns the exit status."""
    startup.mark("imports")
    check_settings(cfg)  # before the manifest, the process group or any model
    cluster = join_cluster(cpu=not torch.cuda.is_available())
    if should_compile(cfg.speed, cluster.device):  # before anything can compile; inductor's import is seconds
        compile_cache.configure(cfg.speed.compile_cache_dir, cluster.local_world_size)
    startup.mark("process_group")
    lifeline = lifecycle.current()
    if lifeline is not None and cluster.distributed:
        lifeline.watch_store(cluster.counter)  # a heartbeat: stop when the other processes' store is gone
    try:
        cluster.agree_on_run(run_key(cfg, output_dir_of(cfg)))
        return _run(cfg, cluster)
    finally:
        if lifeline is not None:
            lifeline.watch_store(None)
        cluster.close()


def _run(cfg: RunConfig, cluster: Cluster) -> int:
    out = output_dir_of(cfg)
    manifest = load_manifest(cfg.manifest, cfg.model, cfg.seed, cfg.ids, cfg.output.format)
    if cluster.is_main:
        for note in manifest.notes:
            log.warning("%s", note)
    if manifest.problems and cfg.on_invalid != "skip":
        raise UserError(manifest.refusal())
    if cfg.from_run:  # the rows as that run made them, or a refusal naming those changed since
        manifest = replayed(cfg, manifest)
    check_replica_rows(cfg, manifest.jobs)  # before any model loads
    if cfg.dry_run:
        if cluster.is_main:
            from batch_runner.run.dry_run import describe

            with output_errors(out, "check the output folder", "nothing was made"):
                check_output_dir(out, manifest.path)  # the dry run refuses the folder the run would refuse

            print(describe(cfg, manifest, cluster, out))
        return 0

    started = time.time()
    with contextlib.ExitStack() as owner:  # the main process's lock on output_dir, released however _run ends
        mine = _claim_and_prepare(cfg, manifest, out, owner) if cluster.is_main else None
        refusal = mine.pop("exception", None) if mine else None
        plan = cluster.broadcast(mine)
        if "error" in plan:
            raise refusal or UserError(plan["error"])
        return _run_claimed(cfg, cluster, manifest, out, plan, started)


def _run_claimed(
    cfg: RunConfig, cluster: Cluster, manifest: Manifest, out: Path, plan: dict[str, Any], started: float
) -> int:
    if not cluster.is_main:  # the terminal shows only its warnings (logs.setup_logging); all goes here
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
    with output_errors(out, "write the results, dataset files and report", KEPT_AT_END):
        table = merge(out, manifest)
        dataset.write_metadata(out, table, manifest)
        if cfg.output.format == "webdataset":
            dataset.write_shards(out, table, manifest, cfg.output.shard_size, rebuild=cfg.overwrite)
        summary = report.write(out, table, manifest, started=started, run_id=plan["run_id"], html=cfg.output.report)
    print(report.summary_text(summary, out))
    # Failed rows are recorded, not fatal: the run itself succeeded (see the README's exit codes).
    return 0


def _claim_and_prepare(cfg: RunConfig, manifest: Manifest, out: Path, owner: contextlib.ExitStack) -> dict[str, Any]:
    """Main process only: make output_dir this run's (or refuse it), then _prepare it.

    A refusal is returned, not raised, so that every process hears of it through the broadcast and
    ends with it instead of waiting for a plan that never comes.
    """
    try:
        with output_errors(out, "prepare the output folder", "nothing was made"):
            check_output_dir(out, manifest.path)
            out.mkdir(parents=True, exist_ok=True)
            owner.enter_context(OutputLock(out))  # before anything is written in it
            return _prepare(cfg, manifest, out)
    except UserError as e:
        return {"error": str(e), "exception": e}


def _prepare(cfg: RunConfig, manifest: Manifest, out: Path) -> dict[str, Any]:
    """Main process only, holding output_dir's lock: set it up and decide what is left to do."""
    mark_output_dir(out)
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
    # Record ids never meet a valid row's id (manifest.record_ids): every refused row gets its record.
    given = manifest.invalid_inputs
    for row_id, reason in manifest.invalid_ids.items():
        log.warning("row %s skipped: %s", row_id, reason)
        results.append(ResultRow.invalid(row_id, reason, finished_at=_now(), **given[row_id]))


def _make_videos(
    cfg: RunConfig, cluster: Cluster, out: Path, run_id: str, pending: list[Job], progress: Progress | None
) -> None:
    """Claim rows and make their videos until none are left.

    With replica.gpus=k, only each replica's leader claims rows, records results and writes videos;
    its k - 1 members make the same rows with it (batch_runner.cluster.parallel).
    """
    ring = cfg.replica.attention == "ring"
    team = form_team(cluster.rank, cluster.world_size, cfg.replica.gpus, cluster.device.type, ring)
    replica = Replica(cfg, cluster.device, cluster.host_peers(), pending, team)
    startup.mark("replica")
    startup.split("replica", replica.build_seconds)
    with output_errors(out, "start this process's results log", KEPT_WHILE_MAKING):
        results = ResultLog(out, run_id, cluster.rank) if team.leads else None
    base = provenance(cfg, replica) | {"config_hash": config_hash(cfg)}
    salt = output_salt(cfg)
    active: list[Writers] = []  # the encoders, once started: an idle wait for claims checks them
    if not team.leads:
        claims = None  # the leader's chunks arrive through team.share
    elif cfg.scheduling == "dynamic":
        claims = Claims(
            cluster.claims(),
            len(pending),
            team.count,
            cfg.chunk_size,
            key="claimed",
            rank=team.index,
            timeout=cfg.claim_timeout,
            on_idle=lambda: _idle(active, progress),
        )
    else:  # "static" (check_settings refused anything else)
        claims = StaticQueue(len(pending), team.index, team.count, cfg.chunk_size)
    queue = team.share(claims)
    # Dynamic claims: a straggler's rows can be taken over, so each row is started and published by
    # one process alone (a replica of several GPUs makes every row its leader yielded, all together).
    owns = claims if isinstance(claims, Claims) else None
    beat = owns.beat if owns else None
    on_step = _first_step_marked(_both(progress.refresh if progress else None, beat))

    def first(position: int, job: Job) -> bool:
        """Whether this copy of the row is the first finished one (a straggler's may come second)."""
        if owns is None or owns.publish(position):
            return True
        log.info("row %s was finished first by another process while this one made no progress: copy discarded", job.id)
        return False

    def finish(row: ResultRow) -> None:
        if results is None:  # a replica's member: its leader records the row
            return
        row = row.but(extra=base, rank=cluster.rank, finished_at=_now())
        with output_errors(out, f"record row {row.id}'s result", KEPT_WHILE_MAKING):
            results.append(row)
        cluster.counter.add("done", 1)
        level = logging.INFO if row.status == "ok" else logging.WARNING
        log.log(
            level,
            "row %s %s in %.1f s%s",
            row.id,
            row.status,
            row.seconds or 0.0,
            f": {row.error}" if row.error else "",
        )

    # Videos are encoded in parallel, each on one thread (batch_runner.outputs.writers); rows are recorded in order.
    encoders = encoder_count(cluster.local_world_size)
    log.info("writing videos with up to %d encoders in parallel", encoders)
    with (
        ThreadPoolExecutor(1, thread_name_prefix="images") as loader,
        Writers(finish, encoders) as writers,
    ):
        active.append(writers)
        for chunk in queue:
            # Rows of one plan together; each keeps its claimed position.
            by_job = {id(pending[i]): i for i in chunk}
            jobs = replica.order([pending[i] for i in chunk])
            positions = [by_job[id(j)] for j in jobs]
            images = _loaded_ahead(loader, jobs, cfg.speed.prefetch, cfg.max_image_pixels)
            encoding = time.perf_counter()
            prompts = replica.encode(jobs)
            # The chunk's texts are encoded in one pass: each row is charged its share.
            text_seconds = round((time.perf_counter() - encoding) / max(1, len(jobs)), 4)
            for position, job, image in zip(positions, jobs, images, strict=False):
                if owns is not None and team.size == 1 and not owns.start(position):
                    continue  # taken over by another process while this one made no progress
                misfit = replica.plans.misfit(job)  # no plan fits it (on_invalid=skip): recorded as failed
                plan = None if misfit else replica.placement_for(job).plan
                row = ResultRow.from_job(job, salt, prompts.warnings.get(job.id), memory_plan=plan)
                row = row.but(text_encode_seconds=text_seconds)
                if misfit is not None:
                    if first(position, job):
                        finish(row.failed(misfit))
                    continue
                started = time.perf_counter()
                try:
                    frames, row = _make_one(replica, job, image.result(), prompts, row, on_step)
                    audio = Audio(*replica.audio) if replica.audio is not None else None
                except ImageLoadError as e:
                    if first(position, job):
                        finish(row.failed(f"image: {e}"))
                    continue
                except Exception as e:
                    release_memory()
                    if first(position, job):
                        finish(getattr(e, "result_row", row).failed(f"{type(e).__name__}: {e}"))
                    continue
                row = row.but(seconds=round(time.perf_counter() - started, 3), peak_memory_gib=_peak_gib())
                row = row.but(**replica.stages)
                _note_first_video(out, cluster.rank)
                if not team.leads:
                    continue
                # Time the GPU stood idle because every encoder was busy (before this row's write is queued).
                row = row.but(writer_wait_seconds=round(writers.wait_for_room(), 4))
                won = functools.partial(first, position, job)
                writers.submit(
                    functools.partial(
                        _publish, out, job, frames, image.result()["image"], row, cfg, first=won, audio=audio
                    )
                )
                if progress:
                    progress.refresh()


def _idle(writers: list[Writers], progress: Progress | None) -> None:
    """While waiting for other processes' rows: end on a failed write of ours, keep the bar moving."""
    for w in writers:
        w.check()
    if progress:
        progress.refresh()


def _both(first: Any, second: Any) -> Any:
    if first is None or second is None:
        return first or second

    def both() -> None:
        first()
        second()

    return both


def _first_step_marked(on_step: Any) -> Any:
    """`on_step`, also marking the end of the first denoising step (start-up ends there)."""

    def step() -> None:
        startup.mark("first_step")
        if on_step:
            on_step()

    return step


def _note_first_video(out: Path, rank: int) -> None:
    if "first_video" in startup.marks():
        return
    startup.mark("first_video")
    with contextlib.suppress(OSError):  # timing is not worth failing a row over
        startup.save(out / LOGS_DIR / f"startup-rank{rank:05d}.json", rank)


def _loaded_ahead(loader: Executor, jobs: list[Job], ahead: int, max_pixels: int) -> Iterator[Future]:
    """Each job's images (`_load_images`), in order, decoded by `loader` up to `ahead` rows ahead of
    the row taken (`speed.prefetch`; 0: each row's once the row before it is done). The first rows'
    begin at once, beside the chunk's text encoding."""
    submit = functools.partial(loader.submit, _load_images, max_pixels=max_pixels)
    decoding = collections.deque(submit(job) for job in jobs[: ahead + 1])

    def in_turn() -> Iterator[Future]:
        for job in jobs[ahead + 1 :]:
            yield decoding.popleft()
            decoding.append(submit(job))
        yield from decoding

    return in_turn()


def _load_images(job: Job, max_pixels: int) -> dict[str, Any]:
    """The row's first frame and, where it gives one, its last, both at the row's size."""
    return {
        "image": load_image(job.image, job.height, job.width, max_pixels),
        "last_image": load_image(job.last_image, job.height, job.width, max_pixels) if job.last_image else None,
    }


def _make_one(replica: Replica, job: Job, image: Any, prompts: Any, row: ResultRow, on_step: Any) -> tuple:
    """Generate one row, redoing it once where that may help:
    * out of GPU memory: one step down (tiles for a whole-frame decode, else the next plan);
    * another error: under the next plan of the ladder (the plan may be what failed);
    * non-finite or constant frames: at the higher precision the family allows.
    Returns the frames and the row, which names the plan that made them and any redo."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    planned = replica.placement_for(job)
    row = row.but(memory_plan=planned.plan)
    try:
        return replica.make(job, image, prompts, on_step), row.but(memory_plan=replica.plan)
    except BadFrames as e:
        remedy = replica.higher_precision()
        if remedy is None:
            raise
        what, context = remedy
        log.warning("row %s: %s; redoing it once with %s", job.id, e, what)
        row = row.but(warnings=_join(row.warnings, f"{e}; redone with {what}"))
        try:
            with context:
                return replica.make(job, image, prompts, on_step), row
        except Exception as again:
            again.result_row = row  # type: ignore[attr-defined]
            raise
    except Exception as e:
        oom = is_out_of_memory(e)
        if (oom and not replica.cfg.memory.fallback_on_oom) or isinstance(e, UserError):
            raise
        failed = replica.placement
        lower = replica.step_down(job, out_of_memory=oom)
        if lower is None:
            raise
        if oom:
            where = " ".join(filter(None, [failed.plan, getattr(e, "failed_at", "")]))
            summary = out_of_memory_summary(e)
            where += f" ({summary})" if summary else ""
            log.warning("row %s ran out of GPU memory under plan %s; retrying with %s", job.id, where, lower)
            note = f"out of GPU memory under plan {where}, redone with {lower}"
        else:
            why = f"{type(e).__name__}: {e}"
            log.warning("row %s failed under plan %s (%s); retrying once with %s", job.id, failed.plan, why, lower)
            note = f"failed under plan {failed.plan} ({why}), redone with {lower}"
        row = row.but(memory_plan=replica.plan, warnings=_join(row.warnings, note))
    # Redone only once the handler has ended: until then the exception's traceback holds the failed
    # call's frames, and with them its activations, so the retry would start with that memory still
    # taken and could run out of it again for no fault of the lower plan.
    release_memory()
    try:
        frames = replica.make(job, image, replica.encode([job]), on_step)
    except Exception as again:
        if not oom:  # it failed under both: the row's failure, not its plan's
            replica.restore(job, planned)
        again.result_row = row  # type: ignore[attr-defined]  # its failure names the plan it failed under
        raise
    if not oom:
        replica.mark_broken(failed, replica.placement)
    return frames, row


def _publish(
    out: Path,
    job: Job,
    frames: Any,
    image: Any,
    row: ResultRow,
    cfg: RunConfig,
    finish: Any,
    first: Any = None,
    audio: Audio | None = None,
) -> None:
    """An encoder thread: the frames' quality, the video (atomically, with its sound where it has
    one), the preview, then the durable result row. A constant video fails its row with the reason
    and is not written. The video is written under a name of this process's own first, and renamed
    into place only if this copy is the row's first finished one (`first()`); a copy that another
    process finished first is discarded. Without `first` (one process), every copy is the first."""
    if first is None:
        first = _always
    relative = f"{VIDEOS_DIR}/{job.id}.mp4"
    quality = measure(frames)
    row = row.but(motion=quality.motion, brightness=quality.brightness)
    if quality.problem:
        if first():
            finish(row.failed(quality.problem))
        return
    final = out / relative
    staged = final.with_name(f".{final.name}.{os.getpid()}.staged{TEMP_SUFFIX}")  # swept at start if killed
    writing = time.perf_counter()
    try:
        # A full or read-only folder ends the run (every later row would fail the same way).
        with output_errors(out, f"write {relative}", KEPT_WHILE_MAKING):
            write_video(frames, staged, job.fps, cfg.output.crf, audio)
        row = row.but(
            write_seconds=round(time.perf_counter() - writing, 4),
            has_audio=audio is not None,
            audio_sample_rate=audio.rate if audio is not None else None,
        )
    except OutputError:
        staged.unlink(missing_ok=True)
        raise
    except Exception as e:
        staged.unlink(missing_ok=True)
        if first():
            finish(row.failed(f"writing video: {type(e).__name__}: {e}"))
        return
    if not first():
        staged.unlink(missing_ok=True)
        return
    with output_errors(out, f"write {relative}", KEPT_WHILE_MAKING):
        os.replace(staged, final)
        fsync_dir(final.parent)
    if cfg.output.report:
        with output_errors(out, f"write {job.id}'s previews", KEPT_WHILE_MAKING):
            report.save_previews(out, job.id, frames, image)
    finish(row.ok(relative))


def _always() -> bool:
    return True


def _join(first: str | None, second: str) -> str:
    return f"{first}; {second}" if first else second


def _peak_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / GIB, 3)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
