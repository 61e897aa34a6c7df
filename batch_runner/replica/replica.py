"""One process's pipeline replica: built once, then asked for one video after another.

The replica encodes the prompts of a whole chunk of rows in one text-encoder pass (each distinct
text once), then denoises and decodes row by row with the transformer kept where the memory plan
put it. A CUDA out-of-memory error on a row moves the replica one plan down the ladder and retries
that row once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from batch_runner import upstream
from batch_runner.cluster.cluster import HostPeers
from batch_runner.cluster.parallel import Team, split_attention
from batch_runner.config import RunConfig
from batch_runner.families.base import DECODER, DENOISER
from batch_runner.inputs.manifest import Job
from batch_runner.replica import fa4, host_weights, placement, planner, speed
from batch_runner.replica.anatomy import anatomy
from batch_runner.replica.pipeline import build_pipeline, torch_dtype

log = logging.getLogger(__name__)

EMBEDDING_CACHE_SIZE = 64


@dataclass
class Prompts:
    """A chunk's encoded texts, and a warning per row whose prompt was cut to fit the encoder."""

    embeddings: dict[str, torch.Tensor]
    warnings: dict[str, str] = field(default_factory=dict)


class Replica:
    def __init__(
        self,
        cfg: RunConfig,
        device: torch.device,
        peers: HostPeers | None = None,
        jobs: Sequence[Job] = (),
        team: Team | None = None,
    ) -> None:
        self.cfg = cfg
        laps = BuildLaps(device)
        self.team = team if team is not None and team.size > 1 else None
        self.device = device
        self._attention = "sdpa"  # the kernel chosen for the denoisers, set in _build
        self.dtype = torch_dtype(cfg.model.dtype)
        self.anatomy = anatomy(cfg.model)
        self.family = self.anatomy.family
        laps.lap("family_imports")  # the family's diffusers and transformers modules, where not imported yet
        peers = peers or HostPeers(0, 1, None, "")
        # Decided once, per row shape; each component below gets its slice of the config, the weights
        # their placement. Built for the slowest placement's host copies, placed for the first row's.
        self.plans = planner.place(cfg, device, peers.local_world_size, jobs, self.anatomy)
        self.placement = self.plans.for_job(jobs[0]) if jobs else self.plans.default
        for line in self.plans.lines():
            log.info("memory plan %s", line)
        laps.lap("plan")
        # Rows of a shape whose plan failed move down the ladder for the rest of the run.
        self._lowered: dict[planner.Shape, planner.Placement] = {}
        self._broken: set[str] = set()  # plans that failed a row another plan then made
        self._lowered_default: planner.Placement | None = None
        self.pipe, self.shared = self._build(peers, laps)
        self.roles = self.family.components(self.pipe)
        self.denoisers = [getattr(self.pipe, n) for n, r in self.roles.items() if r == DENOISER]
        if self.team and cfg.speed.compile == "auto" and speed.should_compile(cfg.speed, device):
            # Not measured with diffusers' context-parallel hooks yet: speed.compile=on tries it.
            log.info("not compiling the transformer blocks: replica.gpus=%d (speed.compile=on to try)", self.team.size)
        elif speed.should_compile(cfg.speed, device) and cfg.speed.cache == "none":
            blocks = sum(
                speed.compile_blocks(self.family.blocks(d), self.family.text_length_inputs) for d in self.denoisers
            )
            log.info("compiling %d transformer blocks with torch.compile (the first video is slower)", blocks)
        laps.lap("compile")
        if self.team:  # after compiling: the context-parallel hooks wrap the compiled forwards
            for denoiser in self.denoisers:
                split_attention(denoiser, self.team, cfg.replica.attention)
        speed.enable_cache(self.pipe, [n for n, r in self.roles.items() if r == DENOISER], cfg.speed)
        # Where rows of the run need different plans, the host copies of what the slowest keeps on the
        # host stay referenced while faster plans hold those components on the GPU.
        switching = device.type == "cuda" and len({p.plan for p in self.plans.placements}) > 1
        keep = planner.host_resident(self.plans.slowest.plan, self.anatomy.roles) if switching else ()
        self.copies = placement.HostCopies(keep)
        placement.apply_plan(self.pipe, self.placement, device, self.roles, self.copies)
        speed.keep_timesteps_on_host(self.pipe, self.family, device)
        # The allocator settings given with the cap (placement.allocator_settings), for the logs and records.
        self.allocator_settings: str | None = None
        if device.type == "cuda":
            release_memory()
            self.allocator_settings = placement.enforce_budget(self.placement.cap_gib, device, self.plans.planned_gib)
            if self.allocator_settings:
                log.info("allocator capped at %s GiB, with %s", self.placement.cap_gib, self.allocator_settings)
            torch.cuda.reset_peak_memory_stats(device)
        laps.lap("placement")
        # Seconds of each part of building this replica (the start-up's `replica` phase, split).
        self.build_seconds: dict[str, float] = laps.seconds
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._clock: _StageClock | None = None
        # Seconds of the last video's stages inside the pipeline call (see make).
        self.stages: dict[str, float] = {}
        # The last video's sound, where the model makes one and output.audio keeps it (see make).
        self.audio: tuple[np.ndarray, int] | None = None  # (samples (channels, n) in [-1, 1], rate)

    @property
    def attention(self) -> str:
        """The kernel the denoisers' attention runs on now: the one chosen, or cuDNN's SDPA once
        FlashAttention-4 failed at a call in this process (fa4.fa4_attention falls back)."""
        return "cudnn" if self._attention == "fa4" and fa4.failure() else self._attention

    @property
    def plan(self) -> str:
        """The memory plan the replica runs now (the current row shape's; lower after a failure)."""
        return self.placement.plan

    def _build(self, peers: HostPeers, laps: BuildLaps) -> tuple[Any, dict[str, host_weights.SharedBlock]]:
        """The pipeline with its final weights, those that stay on the host shared with the host's
        other processes (host_weights) and pinned where a plan of the run streams them."""
        cfg = self.cfg
        slowest = self.plans.slowest
        wanted = self._host_components(slowest) if slowest.share_host_weights else ()
        sharing = host_weights.HostSharing.agree(peers, wanted)
        with sharing.reporting_failure():
            # Random weights are born on the GPU (fast) and moved where the plan wants them.
            build_on = self.device if cfg.model.weights == "random" else torch.device("cpu")
            pipe = build_pipeline(cfg.model, build_on, empty=sharing.mapped)
            laps.lap("weights")
            for name in self.anatomy.of_role(DENOISER):
                denoiser = getattr(pipe, name)
                self.family.streamline(denoiser, cfg.model)
                if cfg.speed.fuse_qkv:
                    speed.fuse_qkv(denoiser)
                self._attention = speed.prefer_attention(
                    self.family, denoiser, cfg.speed.attention, self.device, context_parallel=self.team is not None
                )
                if slowest.fp8_weights:
                    denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=self.dtype)
            laps.lap("prepare")
            # Shared once the weights' shapes and types are final.
            shared = {name: sharing.share(name, getattr(pipe, name)) for name in sharing.groups}
        if self.device.type == "cuda":
            streamed = {n for p in self.plans.placements for n in planner.pinned(p.plan, self.anatomy.roles)}
            for name in streamed:
                if name in shared:
                    shared[name].pin()
        laps.lap("host_sharing")
        return pipe, shared

    def _host_components(self, slowest: planner.Placement) -> tuple[str, ...]:
        """The components whose weights stay in host memory for the whole run: all of them without
        a GPU, else those the run's slowest plan keeps there (the faster plans keep fewer).

        Components that go to the GPU are not shared: diffusers reads safetensors through a memory
        map, so their loading costs page cache every process shares already. Routed through one
        shared copy instead, two processes peaked 22.5 GiB above idle, not 6.6
        (docs/experiments/host_sharing.json).
        """
        if self.device.type != "cuda":
            return tuple(self.anatomy.roles)
        return planner.shareable(slowest.plan, self.anatomy.roles)

    # --- placement per row ---

    @property
    def failed_decoding(self) -> bool:
        """Whether the last video got past its denoising steps (so a failure was in the VAE decode)."""
        return self._clock is not None and self._clock.done >= self._clock.steps

    def placement_for(self, job: Job) -> planner.Placement:
        """The placement `job` runs under: its shape's, or lower where that shape's plan failed."""
        shape = planner.shape_of(job)
        if shape in self._lowered:
            return self._lowered[shape]
        if shape in dict(self.plans.by_shape):
            return self.plans.for_shape(shape)
        return self._lowered_default or self.plans.default

    def order(self, jobs: list[Job]) -> list[Job]:
        """`jobs` with those of the current placement first, then by plan, fastest first: rows of one
        plan run together, so the replica switches placement at most once per plan in a chunk."""
        return sorted(jobs, key=lambda j: (self.placement_for(j) != self.placement, self.placement_for(j).rank))

    def prepare(self, job: Job) -> None:
        """Switch to `job`'s placement if it is not the current one (weights only where the plan changes)."""
        wanted = self.placement_for(job)
        if wanted == self.placement:
            return
        if wanted.same_weights(self.placement):
            placement.set_vae_decode(self.pipe.vae, wanted)
        else:
            log.info("row %s: memory plan %s -> %s (%s)", job.id, self.placement.plan, wanted.plan, wanted.reason)
            release_memory()
            placement.apply_plan(self.pipe, wanted, self.device, self.roles, self.copies)
            self._cache.clear()
        self.placement = wanted

    def step_down(
        self, job: Job | None = None, out_of_memory: bool = True, in_decode: bool | None = None
    ) -> str | None:
        """Move `job`'s shape (every row's without a job) one step down after its plan failed; None at
        the bottom.

        A whole-frame decode that ran out of memory steps down to tiles, under the same plan; anything
        else to the next plan of the ladder that has not failed. None too in a replica of several GPUs:
        one process stepping down alone and retrying the row would leave the others in the middle of
        its collectives. `in_decode`: whether the failure came after the last denoising step, for a
        caller that ran the pipeline itself (None: as `make`'s clock saw it).
        """
        if self.team:
            return None
        current = self.placement
        in_decode = self.failed_decoding if in_decode is None else in_decode
        if out_of_memory and not current.vae_tiling and self.cfg.memory.vae_tiling and in_decode:
            lower = replace(current, vae_tiling=True, reason=f"{current.plan} with VAE tiling (after a failure)")
        else:
            in_steps = out_of_memory and not in_decode
            plan = planner.next_plan_down(current.plan, self.roles, in_steps)
            while plan in self._broken:
                plan = planner.next_plan_down(plan, self.roles, in_steps)
            if plan is None:
                return None
            lower = replace(current, plan=plan, reason=f"{plan} (one plan down after a failure)")
        if job is not None:
            self._lowered[planner.shape_of(job)] = lower
        else:  # every row from now on
            self._lowered = {shape: lower for shape, _ in self.plans.by_shape}
            self._lowered_default = lower
        release_memory()
        if lower.same_weights(current):
            placement.set_vae_decode(self.pipe.vae, lower)
        else:
            placement.apply_plan(self.pipe, lower, self.device, self.roles, self.copies)
        self._cache.clear()
        self.placement = lower
        return lower.plan if lower.plan != current.plan else f"{lower.plan} with VAE tiling"

    def restore(self, job: Job, before: planner.Placement) -> None:
        """Undo a step down for `job`'s shape: the failure was the row's, not its plan's (the next row
        of the shape switches back)."""
        shape = planner.shape_of(job)
        if before == self.plans.for_shape(shape):
            self._lowered.pop(shape, None)
        else:
            self._lowered[shape] = before

    def mark_broken(self, failed: planner.Placement, working: planner.Placement) -> None:
        """`failed`'s plan failed where `working`'s made the same row: every shape planned for the
        failed plan runs under the working one from now on."""
        self._broken.add(failed.plan)
        for shape, planned in self.plans.by_shape:
            if planned.plan == failed.plan and shape not in self._lowered:
                self._lowered[shape] = replace(planned, plan=working.plan, reason=working.reason)

    def higher_precision(self) -> tuple[str, Any] | None:
        """The family's way to redo a row at higher precision (what it changes, a context), or None.

        Under a plan that streams the decoders (full_offload) the context runs with them streamed
        anew from the cast weights (placement.streamed_anew says why)."""
        remedy = self.family.higher_precision(self.pipe)
        streamed = [n for n in planner.pinned(self.placement.plan, self.roles) if self.roles[n] == DECODER]
        if remedy is None or not streamed:
            return remedy
        what, context = remedy
        return what, placement.streamed_anew([getattr(self.pipe, n) for n in streamed], self.device, context)

    # --- prompts ---

    def encode(self, jobs: list[Job]) -> Prompts:
        """Encode every distinct prompt and negative prompt of `jobs` in one text-encoder pass."""
        texts = {job.prompt for job in jobs} | {j.negative_prompt for j in jobs if j.guided}
        warnings = {}
        limit = self.cfg.model.max_sequence_length
        for job in jobs:
            length = len(self.pipe.tokenizer(job.prompt).input_ids)
            if length > limit:
                warnings[job.id] = f"prompt truncated to {limit} tokens (it has {length})"
        missing = sorted(t for t in texts if t not in self._cache)
        if missing:
            with speed.inference(self.cfg.speed, self.device):
                embedded = self.family.encode_prompts(self.pipe, missing, self.cfg.model, self.dtype)
            for text, embedding in zip(missing, embedded, strict=True):
                self._cache[text] = embedding
        result = {}
        for text in texts:
            self._cache.move_to_end(text)
            result[text] = self._cache[text]
        while len(self._cache) > max(EMBEDDING_CACHE_SIZE, len(texts)):
            self._cache.popitem(last=False)
        return Prompts(result, warnings)

    # --- videos ---

    def make(
        self,
        job: Job,
        images: dict[str, Image.Image | None],
        prompts: Prompts,
        on_step: Callable[[], None] | None = None,
    ) -> np.ndarray:
        """One video as uint8 frames (F, H, W, 3); `on_step` is called after each denoising step.

        `images` holds the row's "image" and, where the row gives one, its "last_image". The video's
        sound, where its model makes one, is left in `self.audio` as (samples, rate) (None otherwise, and under
        output.audio=false, which skips decoding it).
        """
        self._clock = None  # a failure before the call below has no stage (and is not the decode's)
        self.prepare(job)
        self.audio = None
        keep_audio = self.cfg.output.audio
        skipping = contextlib.nullcontext() if keep_audio else self.family.audio_skipped(self.pipe)
        execution_device = upstream.execution_device(self.pipe)
        generator = torch.Generator(device=execution_device).manual_seed(job.seed)
        arguments = self.family.call_arguments(self.cfg.model, job, images, prompts.embeddings)
        clock = self._clock = _StageClock(self.device, job.num_inference_steps)
        hooks = [d.register_forward_pre_hook(clock.denoiser_called) for d in self.denoisers]
        try:
            with speed.inference(self.cfg.speed, self.device), skipping:
                output = self.pipe(
                    **arguments,
                    generator=generator,
                    output_type="pt",
                    callback_on_step_end=_step_callback(on_step, clock),
                )
                video = output.frames[0]  # (F, C, H, W) in [0, 1]
                if not torch.isfinite(video).all():  # they would round to black frames, recorded ok
                    raise BadFrames("the frames hold NaN or infinite values (the latents went non-finite)")
                frames = (video * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
                if len(frames) > 1 and bool((frames[1:] == frames[:-1]).all()):  # checked where they are
                    raise BadFrames(
                        f"constant video: all {len(frames)} frames are identical, as a model makes them when its "
                        "latents went non-finite or its guidance collapsed"
                    )
                frames = frames.cpu().numpy()
                track = self.family.audio_track(self.pipe, output) if keep_audio else None
                if track is not None:
                    samples, rate = track
                    if not torch.isfinite(samples).all():
                        raise FloatingPointError("the sound holds NaN or infinite values (the latents went non-finite)")
                    self.audio = (samples.float().cpu().numpy(), rate)
        except BaseException as e:
            e.failed_at = clock.where()  # type: ignore[attr-defined]  # for the runner's warning
            raise
        finally:
            for hook in hooks:
                hook.remove()
        self.stages = clock.stages()
        return frames


class BadFrames(FloatingPointError):
    """A video that must not count as made: non-finite or constant frames (higher precision may help)."""


class BuildLaps:
    """Seconds of each part of building a replica (its family's imports, its plan, weights with their
    LoRAs, the denoisers' preparation, compile wrapping, placement): the start-up's `replica` phase, split.

    Each lap waits for the GPU work its part queued, so a part's time is its own; the few waits
    come once per process, before the first row.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        now = settled_now(self.device)
        self.seconds[part] = round(now - self._last, 3)
        self._last = now


def settled_now(device: torch.device) -> float:
    """perf_counter once the GPU has done the work queued on `device`: a time that owns its GPU work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _StageClock:
    """Where one pipeline call's time goes: before the first denoiser call (image and VAE encode,
    latents), the denoising steps, and after the last step (VAE decode, frames to the host).

    Waits for the GPU twice per video (at the first denoiser call and after the last step), so
    the split is true without slowing the steps between.
    """

    def __init__(self, device: torch.device, steps: int) -> None:
        self.device, self.steps = device, steps
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.done = 0  # denoising steps finished

    def denoiser_called(self, module: Any, args: Any) -> None:
        if self.first is None:
            self.first = settled_now(self.device)

    def step_done(self, step: int) -> None:
        self.done = step + 1
        # The last step waits for the GPU; a schedule of another length still has its latest step's end.
        self.last = settled_now(self.device) if step >= self.steps - 1 else time.perf_counter()

    def where(self) -> str:
        """The stage the call had reached, for a failure's message."""
        return stage_reached(self.done, self.steps, denoising=self.first is not None)

    def stages(self) -> dict[str, float]:
        end = time.perf_counter()
        first = self.first if self.first is not None else self.start
        last = self.last if self.last is not None else end
        return {
            "image_encode_seconds": round(first - self.start, 4),
            "denoise_seconds": round(last - first, 4),
            "decode_seconds": round(end - last, 4),
        }


def stage_reached(done: int, steps: int, denoising: bool) -> str:
    """Where a pipeline call that failed had got to, after `done` of its `steps` denoising steps
    (`denoising`: whether the denoiser had been called)."""
    if done >= steps:
        return "in the VAE decode"
    if not denoising:
        return "before the first denoising step"
    return f"in denoising step {done + 1} of {steps}"


def _step_callback(on_step: Callable[[], None] | None, clock: _StageClock) -> Callable[..., dict]:
    def callback(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        clock.step_done(step)
        if on_step:
            on_step()
        return tensors

    return callback


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


_ASKED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")
_ALLOCATED = re.compile(r"([\d.]+ [KMGT]?i?B) is allocated by PyTorch")


def out_of_memory_summary(error: BaseException) -> str:
    """What the allocator said of the memory when it ran out, as 'asked for 270.00 MiB with 10.13
    GiB allocated' ('' where torch's message names neither): what a memory plan is judged by, where
    the whole message (a paragraph on the allocator's settings) is too long for a row's warning."""
    message = str(error)
    asked, allocated = _ASKED.search(message), _ALLOCATED.search(message)
    parts = ([f"asked for {asked[1]}"] if asked else []) + ([f"{allocated[1]} allocated"] if allocated else [])
    return " with ".join(parts)
