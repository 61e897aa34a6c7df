"""The memory planner: which plan a replica runs, decided once from the model's anatomy and the run.

A batch runner makes hundreds of videos with one replica, so the plans here are batch-aware:

| plan                   | encoders (text, image)    | transformer(s)            | VAE      |
|------------------------|---------------------------|---------------------------|----------|
| none                   | GPU                       | GPU                       | GPU      |
| text_offload           | streamed                  | GPU                       | GPU      |
| expert_offload         | streamed                  | 1st expert streamed, 2nd on the GPU (two-expert models) | GPU |
| group_offload          | streamed                  | streamed block by block   | GPU      |
| full_offload           | streamed                  | streamed block by block   | streamed |
| model_cpu_offload      | diffusers' whole-model CPU offload, per video (reference recipe)  |
| sequential_cpu_offload | diffusers' per-layer CPU offload, per video (reference recipe)    |

"Streamed" is diffusers' group offloading with CUDA streams (the encoders and the VAE layer by
layer): weights sit in pinned host memory and the next group is copied while the current one
computes. Prompts of a chunk are encoded together, so a text encoder (9.5 GB for CogVideoX's T5,
11 GB for Wan's UMT5) crosses the bus once per chunk, not once per video. Which components a model
has, and their roles, come from its family.

`auto` picks the fastest plan (in LADDER's order) whose estimated peak fits the GPU budget and
whose pinned host memory fits this host (one copy shared by the host's processes,
batch_runner.replica.host_weights, or a copy each out of an equal share), and says why. The
estimates are weights (counted from the architecture) plus activation terms each model family fits
to measurements on an H100 (docs/benchmarks.md).

The planner loads nothing and builds nothing: `dry_run` plans from a model's anatomy alone. What it
decides is one `Placement`, which batch_runner.replica.placement applies to the built pipeline.
Two functions read this machine rather than compute: `gpu_budget_gib` (the GPU's free memory) and
`host_available_gib` (/proc/meminfo); they are the planner's inputs and need no model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from batch_runner.config import MemoryConfig, RunConfig
from batch_runner.errors import UserError
from batch_runner.families.base import DECODER, DENOISER, ENCODER, ActivationTerms
from batch_runner.families.rules import valid_frame_counts

if TYPE_CHECKING:
    from batch_runner.inputs.manifest import Job
    from batch_runner.replica.anatomy import Anatomy

log = logging.getLogger(__name__)

GIB = 1024**3
# Fastest first. `auto` and the out-of-memory fallback walk down this ladder; a plan a model cannot
# use (expert_offload without two experts) is passed over.
LADDER = ("none", "text_offload", "expert_offload", "group_offload", "full_offload", "sequential_cpu_offload")
PLANS = (
    "none",
    "text_offload",
    "expert_offload",
    "group_offload",
    "full_offload",
    "model_cpu_offload",
    "sequential_cpu_offload",
)
# The caching allocator reserves more than it allocates (measured: reserved/allocated up to 1.11),
# and the CUDA context and cuBLAS workspaces want room of their own.
FRAGMENTATION = 1.12
HEADROOM_GIB = 0.5
STREAMED_PLANS = ("expert_offload", "group_offload", "full_offload", "sequential_cpu_offload")
# Blocks of a streamed denoiser on the GPU at once: the one computing and the next being copied in.
STREAMED_BLOCKS = 2
# The plans that stream their host-resident components with diffusers' group offloading.
GROUP_OFFLOADED = ("text_offload", "expert_offload", "group_offload", "full_offload")


def host_resident(plan: str, roles: dict[str, str]) -> tuple[str, ...]:
    """The components whose weights stay in host memory while `plan` runs.

    expert_offload streams the first expert (Wan 2.2 A14B's high-noise transformer, which runs
    the fewer steps) and keeps the second on the GPU. full_offload streams the VAE too: where the
    decode's activations and the resident VAE together are what break the budget (LTX-2 at 12 GiB).
    """
    encoders = tuple(n for n, r in roles.items() if r == ENCODER)
    denoisers = tuple(n for n, r in roles.items() if r == DENOISER)
    decoders = tuple(n for n, r in roles.items() if r == DECODER)
    return {
        "none": (),
        "text_offload": encoders,
        "expert_offload": encoders + denoisers[:1],
        "group_offload": encoders + denoisers,
        "full_offload": encoders + denoisers + decoders,
        "model_cpu_offload": tuple(roles),
        "sequential_cpu_offload": tuple(roles),
    }[plan]


def applies(plan: str, roles: dict[str, str]) -> bool:
    """Whether `plan` means something for a model with these components."""
    return plan != "expert_offload" or sum(r == DENOISER for r in roles.values()) > 1


def pinned(plan: str, roles: dict[str, str]) -> tuple[str, ...]:
    """The components group offloading streams under `plan`: it wants their host copy pinned."""
    return host_resident(plan, roles) if plan in GROUP_OFFLOADED else ()


def shareable(plan: str, roles: dict[str, str]) -> tuple[str, ...]:
    """The host-resident components one host copy can serve for the whole run.

    Model CPU offload moves whole models back to the host with `.to("cpu")`, which makes a new
    private copy each time, so its weights cannot stay shared.
    """
    return () if plan == "model_cpu_offload" else host_resident(plan, roles)


@dataclass(frozen=True)
class Workload:
    """The largest video a process will make: what sizes the activations."""

    tokens: int  # transformer tokens of one sequence (family geometry)
    hidden: int  # transformer width (heads x head dim)
    batch: int  # samples in one forward of the denoiser (the family's `forward_batch`)
    pixels: int  # height x width of one output frame
    vae_channels: int  # widest VAE block
    frames: int = 0  # output frames (0: not known; a decode that grows with them is taken as measured)
    cached_outputs: int = 0  # block outputs a step cache keeps between steps (speed.cached_block_outputs)


@dataclass(frozen=True)
class Estimate:
    plan: str
    gpu_gib: float
    host_gib: float  # pinned or private host memory this process holds
    decode_gib: float = 0.0  # the VAE decode's activations (whole frames or tiles, as estimated)


@dataclass(frozen=True)
class Choice:
    plan: str
    reason: str
    estimates: tuple[Estimate, ...]
    vae_tile: int | None = None  # the decode tile's side in pixels; None: the VAE's own
    vae_tiling: bool = True  # whether the VAE decodes in tiles (False: whole frames, where they fit)
    whole_decode_gib: float = 0.0  # the whole-frame decode's estimated activations


def activation_gib(
    workload: Workload, terms: ActivationTerms, vae_tiling: bool, streamed: bool, vae_tile: int | None = None
) -> tuple[float, float]:
    """(denoising peak, decoding peak) activations in GiB for one video."""
    per_unit = terms.streamed if streamed else terms.resident
    denoise = per_unit * workload.batch * workload.tokens * workload.hidden
    tiled = terms.tiled_pixels
    if vae_tile is not None and terms.tile_side:
        tiled = int(tiled * (vae_tile / terms.tile_side) ** terms.tile_scaling)
    pixels = min(workload.pixels, tiled) if vae_tiling else workload.pixels
    if pixels > terms.tiled_pixels:
        # Beyond the VAE's own tile the decode grows as a tile's does with its side (tile_scaling).
        pixels = int(terms.tiled_pixels * (pixels / terms.tiled_pixels) ** (terms.tile_scaling / 2))
    decode = terms.decode_per_pixel * pixels * workload.vae_channels / 512
    if terms.decode_frames and workload.frames:  # a VAE that decodes every frame at once
        decode *= workload.frames / terms.decode_frames
    # bf16 outputs held across steps (measured with Pyramid Attention Broadcast: 8.6 GiB more).
    denoise += workload.cached_outputs * workload.batch * workload.tokens * workload.hidden * 2
    return denoise / GIB, decode / GIB


def estimate(plan: str, model: Anatomy, workload: Workload, config: MemoryConfig) -> Estimate:
    """Peak GPU memory (as the allocator reserves it) and host memory of `plan`, in GiB.

    A video passes three phases, and the peak is the largest: the text (and image) encoders, the
    denoising steps, the VAE decode. Under the streamed plans only the VAE and the denoiser's weights
    outside its blocks stay resident through all three; streaming adds the block being copied in
    beside the one computing (measured: Wan 2.1 14B's group_offload peak is its resident weights,
    the denoising activations and two blocks, docs/benchmarks.json) during the steps only, and the
    encoders' largest layer with the next during the text encoding only.
    """
    sizes = {name: b / GIB for name, b in model.bytes.items()}
    block, rest = model.block_bytes / GIB, model.denoiser_rest_bytes / GIB
    if config.fp8_weights:
        sizes = {n: s / 2 if model.roles[n] == DENOISER else s for n, s in sizes.items()}
        block, rest = block / 2, rest / 2
    encoders = [sizes[n] for n, r in model.roles.items() if r == ENCODER]
    denoisers = [sizes[n] for n, r in model.roles.items() if r == DENOISER]
    vae = sum(sizes[n] for n, r in model.roles.items() if r == DECODER)
    terms = model.family.activations
    denoise, decode = activation_gib(workload, terms, config.vae_tiling, plan in STREAMED_PLANS, config.vae_tile)
    streaming = STREAMED_BLOCKS * block + denoise  # the steps of a streamed denoiser
    encoder_streamed = model.leaf_bytes / GIB
    gpu = {
        "none": sum(sizes.values()) + max(denoise, decode),
        "text_offload": sum(denoisers) + vae + max(denoise, decode, encoder_streamed),
        # The second expert resident, the first streamed (its top level stays resident).
        "expert_offload": sum(denoisers[1:]) + rest + vae + max(streaming, decode, encoder_streamed),
        "group_offload": vae + rest + max(streaming, decode, encoder_streamed),
        # As group_offload, with the VAE's layers streamed in beside its decode instead of resident.
        "full_offload": rest + max(streaming, decode + model.decoder_leaf_bytes / GIB, encoder_streamed),
        "model_cpu_offload": max(max(encoders, default=0), max(denoisers) + denoise, vae + decode),
        # The transformer's blocks stream in during the steps only; the VAE streams its own small layers.
        "sequential_cpu_offload": max(denoise + STREAMED_BLOCKS * block, decode),
    }[plan]
    host = sum(sizes[name] for name in host_resident(plan, model.roles))
    return Estimate(plan, round(gpu * FRAGMENTATION + HEADROOM_GIB, 2), round(host, 2), round(decode, 2))


def choose_plan(
    model: Anatomy,
    workload: Workload,
    config: MemoryConfig,
    budget_gib: float,
    host_gib: float,
    local_world_size: int,
) -> Choice:
    """The fastest plan that fits both the GPU budget and the host's memory, decoding whole frames
    where they fit and in tiles only where they do not.

    With memory.share_host_weights, the processes of a host hold one copy of a plan's host-resident
    weights between them; otherwise each process needs its own, out of an equal share of the host.
    """
    processes = max(1, local_world_size)
    shared = config.share_host_weights and processes > 1
    usable = [p for p in PLANS if applies(p, model.roles)]
    ladder = [p for p in LADDER if p in usable]
    decodes = {p: fit_decode(p, model, workload, config, budget_gib) for p in usable}
    estimates = tuple(
        estimate(p, model, workload, replace(config, vae_tiling=decodes[p][0], vae_tile=decodes[p][1])) for p in usable
    )
    by_plan = {e.plan: e for e in estimates}
    whole = estimate("none", model, workload, replace(config, vae_tiling=False)).decode_gib
    host = {p: _host_need(by_plan[p], model.roles, shared, processes, host_gib) for p in usable}
    for plan in ladder:
        e, (tiling, tile) = by_plan[plan], decodes[plan]
        if e.gpu_gib <= budget_gib and host[plan][0]:
            faster = ladder[: ladder.index(plan)]
            why = "; ".join(_why_not(by_plan[p], budget_gib, host[p][1]) for p in faster)
            reason = (
                f"{plan}{_decode_words(tiling, tile, config)}: needs ~{e.gpu_gib:.2f} GiB of the {budget_gib:.1f} GiB "
                f"GPU budget and {host[plan][1]}"
                + (f" (faster plans do not fit: {why})" if why else " (the fastest plan)")
                + _whole_words(tiling, config, whole)
            )
            return Choice(plan, reason, estimates, tile, tiling, whole)
    lines = "; ".join(_why_not(by_plan[p], budget_gib, host[p][1]) for p in ladder)
    raise UserError(
        f"No memory plan fits: {lines}. Give more GPU memory (memory.budget_gib), fewer processes per "
        f"host (accelerate launch --num_processes) or more host memory (memory.host_budget_gib)."
    )


def _decode_words(tiling: bool, tile: int | None, config: MemoryConfig) -> str:
    """The tiles the plan's reason names after the plan: none for whole frames or the configured tile."""
    return f" with {tile}-pixel VAE tiles" if tiling and tile != config.vae_tile else ""


def _whole_words(tiling: bool, config: MemoryConfig, whole_gib: float) -> str:
    """The end of a reason: how the VAE decodes, where the planner decided it."""
    if not config.vae_tiling or config.vae_tile is not None:
        return ""
    if tiling:
        return f"; VAE decoding in tiles (whole frames would need ~{whole_gib:.1f} GiB)"
    return f"; whole-frame VAE decoding (~{whole_gib:.1f} GiB)"


def fit_decode(
    plan: str, model: Anatomy, workload: Workload, config: MemoryConfig, budget_gib: float | None
) -> tuple[bool, int | None]:
    """(tiling, tile) for `plan`: whole frames wherever their decode fits the budget, else tiles.

    Tiling costs time (Wan 2.1 480p: 7.83 s outside the steps tiled, 3.09 s whole, with 47 GiB of a
    140 GiB card in use), so it is only where the whole-frame decode does not fit. memory.vae_tiling=false
    never tiles; a memory.vae_tile the user sets always does. Without a budget, nothing is tiled.
    """
    if not config.vae_tiling:
        return False, None
    if config.vae_tile is not None:
        return True, config.vae_tile
    if budget_gib is None or estimate(plan, model, workload, replace(config, vae_tiling=False)).gpu_gib <= budget_gib:
        return False, None
    return True, fit_tile(plan, model, workload, config, budget_gib)


def fit_tile(
    plan: str, model: Anatomy, workload: Workload, config: MemoryConfig, budget_gib: float | None
) -> int | None:
    """The decode tile `plan` should use when it tiles: memory.vae_tile when set, else the VAE's own,
    else the largest smaller tile the model allows whose estimate fits the budget (the smallest if none does).

    Only the decode's peak changes: a smaller tile decodes the same pixels in more, smaller pieces.
    """
    terms = model.family.activations
    if config.vae_tile is not None or not config.vae_tiling or not terms.smaller_tiles or budget_gib is None:
        return config.vae_tile
    for tile in (None, *terms.smaller_tiles):
        if estimate(plan, model, workload, replace(config, vae_tile=tile)).gpu_gib <= budget_gib:
            return tile
    return terms.smaller_tiles[-1]


def _host_need(e: Estimate, roles: dict[str, str], shared: bool, processes: int, host_gib: float) -> tuple[bool, str]:
    """Whether `e`'s host-resident weights fit this host, and the sentence that says so."""
    if shared and shareable(e.plan, roles):
        fits = e.host_gib <= host_gib
        return fits, f"{e.host_gib:.1f} GiB of host memory, one copy for the {processes} processes of this host " + (
            f"(of {host_gib:.1f} GiB)" if fits else f"> {host_gib:.1f} GiB"
        )
    share = host_gib / processes
    fits = e.host_gib <= share
    return fits, f"{e.host_gib:.1f} GiB of this process's {share:.1f} GiB host share" if fits else (
        f"{e.host_gib:.2f} GiB host > {share:.2f} per process"
    )


def _why_not(e: Estimate, budget_gib: float, host: str) -> str:
    if e.gpu_gib > budget_gib:
        return f"{e.plan} needs ~{e.gpu_gib:.2f} GiB GPU > {budget_gib:.2f}"
    return f"{e.plan} needs {host}"


# Plans whose denoising steps hold what the plan above them holds: a failure in the steps passes over them.
SAME_STEPS_AS_ABOVE = ("full_offload",)


def next_plan_down(plan: str, roles: dict[str, str], in_steps: bool = False) -> str | None:
    """The plan to retry with after a failure, or None at the bottom. `in_steps`: the failure came
    in the denoising steps (out of memory there), where full_offload holds what group_offload does."""
    ladder = [p for p in LADDER if applies(p, roles)]
    position = ladder.index(plan) if plan in ladder else ladder.index("group_offload")
    lower = ladder[position + 1 :]
    if in_steps:
        lower = [p for p in lower if p not in SAME_STEPS_AS_ABOVE]
    return lower[0] if lower else None


def gpu_budget_gib(config: MemoryConfig, device: torch.device) -> float:
    """The GPU memory this process may use: the configured budget, else what is free now."""
    free, total = torch.cuda.mem_get_info(device)
    if config.budget_gib is None:
        return free / GIB
    if config.budget_gib * GIB > total:
        log.warning("memory.budget_gib=%.1f is more than the GPU's %.1f GiB", config.budget_gib, total / GIB)
    return min(config.budget_gib, total / GIB)


def host_available_gib(config: MemoryConfig) -> float:
    """Host memory the processes on this host may share: the configured budget, else MemAvailable."""
    if config.host_budget_gib is not None:
        return config.host_budget_gib
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / GIB


def cached_block_outputs(cache: str, layers: int) -> int:
    """Block outputs the step cache (speed.cache) keeps from one step to the next: the planner makes room.

    Pyramid Attention Broadcast keeps every block's attention output (measured: 8.6 GiB for
    CogVideoX-5B at 49x480x720); First Block Cache keeps the residuals of the blocks it skips.
    """
    return {"pyramid": layers, "first_block": 2}.get(cache, 0)


@dataclass(frozen=True)
class Shape:
    """A row's size as the planner sees it: rows of one shape need the same plan."""

    frames: int
    height: int
    width: int
    guided: bool

    def __str__(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}" + ("" if self.guided else " unguided")


def shape_of(job: Job) -> Shape:
    return Shape(job.num_frames, job.height, job.width, job.guided)


def default_shape(cfg: RunConfig) -> Shape:
    model = cfg.model
    return Shape(model.num_frames, model.height, model.width, model.guided)


def workload_of(cfg: RunConfig, jobs: Sequence[Job] = (), model: Anatomy | None = None) -> Workload:
    """The largest video among the model's default row and the rows given (what one plan for all
    of them must make room for)."""
    model = model or _anatomy_of(cfg)
    geometry = model.geometry
    config = cfg.model
    sizes = [(config.num_frames, config.height, config.width)] + [(j.num_frames, j.height, j.width) for j in jobs]
    frames, height, width = max(sizes, key=lambda s: geometry.tokens(*s, config.max_sequence_length))
    largest = Shape(frames, height, width, config.guided or any(j.guided for j in jobs))
    return replace(
        shape_workload(cfg, model, largest), pixels=max(h * w for _, h, w in sizes), frames=max(f for f, _, _ in sizes)
    )


def shape_workload(cfg: RunConfig, model: Anatomy, shape: Shape) -> Workload:
    """The workload of one row shape."""
    geometry = model.geometry
    tokens = geometry.tokens(shape.frames, shape.height, shape.width, cfg.model.max_sequence_length)
    return Workload(
        # A replica of k GPUs splits the token sequence k ways (weights and the VAE's decode are not split).
        tokens=-(-tokens // max(1, cfg.replica.gpus)),
        hidden=geometry.hidden,
        batch=model.family.forward_batch(cfg.model, shape.guided),
        pixels=shape.height * shape.width,
        vae_channels=geometry.vae_channels,
        frames=shape.frames,
        cached_outputs=cached_block_outputs(cfg.speed.cache, model.blocks),
    )


def auto_plan(
    cfg: RunConfig,
    budget_gib: float,
    local_world_size: int,
    jobs: Sequence[Job] = (),
    model: Anatomy | None = None,
) -> Choice:
    """memory=auto's one choice for the largest row of the run (see `plan_rows` for a plan per shape)."""
    model = model or _anatomy_of(cfg)
    return choose_plan(
        model,
        workload_of(cfg, jobs, model),
        cfg.memory,
        budget_gib,
        host_available_gib(cfg.memory),
        local_world_size,
    )


def _anatomy_of(cfg: RunConfig) -> Anatomy:
    """The model's anatomy when the caller has none: built on the meta device, so imported only then."""
    from batch_runner.replica.anatomy import anatomy

    return anatomy(cfg.model)


# --- the decision, made once ----------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a replica's weights live and how its VAE decodes, for the rows of one shape: decided
    before anything is built.

    Weight placement (batch_runner.replica.placement) applies it and host_weights shares what it
    keeps on the host; neither reads the run's config. An out-of-memory error steps `plan` down.
    """

    plan: str
    reason: str
    vae_slicing: bool = True
    vae_tiling: bool = True
    vae_tile: int | None = None  # the decode tile's side in pixels; None: the VAE's own
    fp8_weights: bool = False  # denoiser weights stored in float8
    share_host_weights: bool = True  # one host copy of the host-resident weights for the host's processes
    cap_gib: float | None = None  # the allocator's cap (memory.budget_gib, enforced); None: uncapped
    gpu_gib: float | None = None  # the plan's estimated peak; None where nothing was estimated (no GPU)
    whole_decode_gib: float | None = None  # the whole-frame VAE decode's estimated activations

    @property
    def rank(self) -> int:
        """Position in PLANS: the later, the less GPU memory the plan holds (model_cpu_offload, which
        `auto` never plans, between full and sequential); along LADDER also the slower."""
        return PLANS.index(self.plan)

    def same_weights(self, other: Placement) -> bool:
        """Whether the weights sit where `other` puts them (only the VAE's decode switches may differ)."""
        return self.plan == other.plan and self.fp8_weights == other.fp8_weights


@dataclass(frozen=True)
class RowPlans:
    """One placement per row shape of the run: rows that fit a faster plan run under it.

    The replica switches placement between shapes only when a row needs another; the runner orders
    each chunk's rows by plan, so that the switches stay few.
    """

    by_shape: tuple[tuple[Shape, Placement], ...]
    default: Placement  # rows of a shape not planned for (none in a run; a row given later)
    # Shapes no plan fits, each with why, under on_invalid=skip: their rows are recorded as failed.
    misfits: tuple[tuple[Shape, str], ...] = ()

    def misfit(self, job: Job) -> str | None:
        """Why no plan fits `job`'s shape, or None where one does."""
        return dict(self.misfits).get(shape_of(job))

    def for_shape(self, shape: Shape) -> Placement:
        return dict(self.by_shape).get(shape, self.default)

    def for_job(self, job: Job) -> Placement:
        return self.for_shape(shape_of(job))

    @property
    def placements(self) -> tuple[Placement, ...]:
        """The distinct placements, fastest first."""
        seen = {p: None for _, p in sorted(self.by_shape, key=lambda sp: sp[1].rank)}
        return tuple(seen) or (self.default,)

    @property
    def slowest(self) -> Placement:
        return max(self.placements, key=lambda p: p.rank)

    @property
    def planned_gib(self) -> float | None:
        """The most GPU memory any of the run's placements is planned to reserve (None: not estimated)."""
        needs = [p.gpu_gib for p in self.placements]
        return None if None in needs else max(needs)

    def lines(self) -> list[str]:
        """One line per placement, naming the shapes it serves (logs and the dry run)."""
        skipped = [f"rows of {shape}: recorded as failed (on_invalid=skip): {why}" for shape, why in self.misfits]
        if len(self.placements) == 1 and not skipped:
            return [self.placements[0].reason]
        shapes = [
            f"rows of {', '.join(str(s) for s, q in self.by_shape if q == p)}: {p.reason}" for p in self.placements
        ]
        return shapes + skipped


def plan_rows(
    cfg: RunConfig,
    budget_gib: float | None,
    local_world_size: int,
    jobs: Sequence[Job] = (),
    model: Anatomy | None = None,
) -> RowPlans:
    """The placement of every row shape of `jobs` (the model's default row where none are given).

    Pure: from the model's anatomy, the budget and the host's memory; `dry_run` shows it, the replica
    carries it out. `budget_gib` None means no GPU: everything runs in place on the CPU.
    """
    config = cfg.memory
    shapes = list(dict.fromkeys(shape_of(j) for j in jobs)) or [default_shape(cfg)]
    if budget_gib is None:
        one = _placement(
            config,
            "none",
            "none: no GPU, everything runs on the CPU",
            config.vae_tiling,  # as configured: nothing to fit on the CPU
            config.vae_tile,
        )
        return RowPlans(tuple((s, one) for s in shapes), one)
    model = model or _anatomy_of(cfg)
    host = host_available_gib(config)
    by_shape = []
    misfits = []
    for shape in shapes:
        workload = shape_workload(cfg, model, shape)
        if config.plan == "auto":
            try:
                choice = choose_plan(model, workload, config, budget_gib, host, local_world_size)
            except UserError as e:
                misfits.append((shape, e))
                continue
            plan, reason, tiling, tile = choice.plan, choice.reason, choice.vae_tiling, choice.vae_tile
        else:
            plan = config.plan
            tiling, tile = fit_decode(plan, model, workload, config, budget_gib)
            how = _decode_words(tiling, tile, config).replace(" with", ", with", 1)
            whole = estimate(plan, model, workload, replace(config, vae_tiling=False)).decode_gib
            reason = f"{plan}: chosen in the config (memory={plan}){how}{_whole_words(tiling, config, whole)}"
        need = estimate(plan, model, workload, replace(config, vae_tiling=tiling, vae_tile=tile))
        whole = estimate(plan, model, workload, replace(config, vae_tiling=False)).decode_gib
        by_shape.append((shape, _placement(config, plan, reason, tiling, tile, need.gpu_gib, whole)))
    reasons = tuple(
        (shape, _misfit_reason(cfg, model, shape, budget_gib, host, local_world_size, e)) for shape, e in misfits
    )
    if reasons and (cfg.on_invalid != "skip" or not by_shape):
        raise UserError(_refusal(reasons, jobs, some_fit=bool(by_shape)))
    slowest = max((p for _, p in by_shape), key=lambda p: p.rank)
    return RowPlans(tuple(by_shape), slowest, reasons)


def _misfit_reason(
    cfg: RunConfig,
    model: Anatomy,
    shape: Shape,
    budget_gib: float,
    host_gib: float,
    local_world_size: int,
    error: UserError,
) -> str:
    """choose_plan's refusal for `shape`, with the most frames that would fit at its size (the
    frames are what a row can give up without changing its picture), or that none would."""
    fitting = None
    for frames in reversed(valid_frame_counts(cfg.model)):
        if frames >= shape.frames:
            continue
        smaller = shape_workload(cfg, model, replace(shape, frames=frames))
        try:
            choose_plan(model, smaller, cfg.memory, budget_gib, host_gib, local_world_size)
        except UserError:
            continue
        fitting = frames
        break
    if fitting is None:
        return f"{error} No frame count fits at {shape.height}x{shape.width} either."
    return f"{error} Or make the rows shorter: at {shape.height}x{shape.width}, num_frames={fitting} fits."


def _refusal(reasons: tuple[tuple[Shape, str], ...], jobs: Sequence[Job], some_fit: bool) -> str:
    """The run's refusal: the rows of the first shape no plan fits and why, the other such shapes,
    and, where some rows do fit, that on_invalid=skip would make those."""
    (shape, why), others = reasons[0], [str(s) for s, _ in reasons[1:]]
    ids = [job.id for job in jobs if shape_of(job) == shape]
    rows = f"rows of {shape} ({_some(ids)})" if ids else f"the default row ({shape})"
    return (
        f"{rows}: {why}"
        + (f" Rows of {', '.join(others)} fit no plan either." if others else "")
        + (
            " Or pass on_invalid=skip to record the rows no plan fits as failed and make the others."
            if some_fit
            else ""
        )
    )


def _some(ids: list[str], shown: int = 3) -> str:
    """A few row ids, and how many more."""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(repr(i) for i in ids[:shown]) + more


def _placement(
    config: MemoryConfig,
    plan: str,
    reason: str,
    tiling: bool,
    tile: int | None,
    gpu_gib: float | None = None,
    whole_decode_gib: float | None = None,
) -> Placement:
    return Placement(
        plan=plan,
        reason=reason,
        vae_slicing=config.vae_slicing,
        vae_tiling=tiling,
        vae_tile=tile if tiling else None,
        fp8_weights=config.fp8_weights,
        share_host_weights=config.share_host_weights,
        cap_gib=config.budget_gib if config.enforce_budget else None,
        gpu_gib=gpu_gib,
        whole_decode_gib=whole_decode_gib,
    )


def place(
    cfg: RunConfig,
    device: torch.device,
    local_world_size: int,
    jobs: Sequence[Job] = (),
    model: Anatomy | None = None,
) -> RowPlans:
    """The replica's placements, one per row shape of `jobs`: the configured or the fastest fitting
    plan, how the VAE decodes, and why."""
    budget = gpu_budget_gib(cfg.memory, device) if device.type == "cuda" else None
    return plan_rows(cfg, budget, local_world_size, jobs, model)
