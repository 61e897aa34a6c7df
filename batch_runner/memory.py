"""Memory plans: where each component's weights live while a process makes its videos.

A batch runner makes hundreds of videos with one replica, so the plans here are batch-aware:

| plan                   | text encoder              | transformer               | VAE      |
|------------------------|---------------------------|---------------------------|----------|
| none                   | GPU                       | GPU                       | GPU      |
| text_offload           | streamed per chunk        | GPU                       | GPU      |
| group_offload          | streamed per chunk        | streamed block by block   | GPU      |
| model_cpu_offload      | diffusers' whole-model CPU offload, per video (reference recipe)  |
| sequential_cpu_offload | diffusers' per-layer CPU offload, per video (reference recipe)    |

"Streamed" is diffusers' group offloading with CUDA streams: weights sit in pinned host memory and
the next group is copied while the current one computes. Prompts of a chunk are encoded together,
so the 9.5 GB text encoder crosses the bus once per chunk, not once per video.

`auto` picks the fastest plan whose estimated peak fits the GPU budget and whose pinned host memory
fits this host (one copy shared by the host's processes, batch_runner.host_weights, or a copy
each out of an equal share), and says why. The estimates are weights (counted from the architecture)
plus activation terms fitted to measurements on an H100 (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from batch_runner.config import MemoryConfig
from batch_runner.errors import UserError

log = logging.getLogger(__name__)

GIB = 1024**3
# Fastest first. `auto` and the out-of-memory fallback walk down this ladder.
LADDER = ("none", "text_offload", "group_offload", "sequential_cpu_offload")
PLANS = ("none", "text_offload", "group_offload", "model_cpu_offload", "sequential_cpu_offload")
# Activation terms, fitted to peaks measured on an H100 with CogVideoX-5B-I2V at 49x480x720 with
# guidance (docs/benchmarks.json): bytes per (token x hidden unit x batch element) while denoising.
# Measured with the same compiled blocks: 3.9 GiB of activations above the weights for the resident
# plans (none 23.64 GiB peak, text_offload 14.76; 4.25 GiB here, so that the estimate also covers
# what the allocator reserved), 3.2 GiB for the streamed transformer (group_offload 4.4 GiB peak
# in all at an 8 GiB budget).
DENOISE_BYTES_PER_TOKEN_UNIT = {"resident": 42.0, "streamed": 31.5}
VAE_DECODE_BYTES_PER_PIXEL = 2900.0
VAE_TILED_PIXELS = 240 * 360 * 2  # the largest region a tiled decode holds at once, per frame pair
# The caching allocator reserves more than it allocates (measured: reserved/allocated up to 1.11),
# and the CUDA context and cuBLAS workspaces want room of their own.
FRAGMENTATION = 1.12
HEADROOM_GIB = 0.5
STREAMED_PLANS = ("group_offload", "sequential_cpu_offload")
COMPONENTS = ("text_encoder", "transformer", "vae")
# The components whose weights stay in host memory while each plan runs.
HOST_RESIDENT = {
    "none": (),
    "text_offload": ("text_encoder",),
    "group_offload": ("text_encoder", "transformer"),
    "model_cpu_offload": COMPONENTS,
    "sequential_cpu_offload": COMPONENTS,
}
# The plans that stream their host-resident components with diffusers' group offloading.
GROUP_OFFLOADED = ("text_offload", "group_offload")


def pinned(plan: str) -> tuple[str, ...]:
    """The components group offloading streams under `plan`: it wants their host copy pinned."""
    return HOST_RESIDENT[plan] if plan in GROUP_OFFLOADED else ()


def shareable(plan: str) -> tuple[str, ...]:
    """The host-resident components one host copy can serve for the whole run.

    Model CPU offload moves whole models back to the host with `.to("cpu")`, which makes a new
    private copy each time, so its weights cannot stay shared.
    """
    return () if plan == "model_cpu_offload" else HOST_RESIDENT[plan]


@dataclass(frozen=True)
class Workload:
    """The largest video a process will make: what sizes the activations."""

    frames: int
    height: int
    width: int
    guidance: bool
    text_tokens: int
    hidden: int  # transformer width (heads x head dim)
    vae_channels: int  # widest VAE block
    patch: int = 2
    patch_t: int = 1  # CogVideoX1.5 also patches time by 2
    spatial: int = 8
    temporal: int = 4
    cached_outputs: int = 0  # block outputs a step cache keeps between steps (speed.cached_block_outputs)

    @property
    def tokens(self) -> int:
        latent_frames = (self.frames - 1) // self.temporal + 1
        grid = (self.height // (self.spatial * self.patch)) * (self.width // (self.spatial * self.patch))
        return -(-latent_frames // self.patch_t) * grid + self.text_tokens


@dataclass(frozen=True)
class Estimate:
    plan: str
    gpu_gib: float
    host_gib: float  # pinned or private host memory this process holds


@dataclass(frozen=True)
class Choice:
    plan: str
    reason: str
    estimates: tuple[Estimate, ...]


def activation_gib(workload: Workload, vae_tiling: bool, streamed: bool) -> tuple[float, float]:
    """(denoising peak, decoding peak) activations in GiB for one video."""
    batch = 2 if workload.guidance else 1
    per_unit = DENOISE_BYTES_PER_TOKEN_UNIT["streamed" if streamed else "resident"]
    denoise = per_unit * batch * workload.tokens * workload.hidden
    pixels = workload.height * workload.width
    if vae_tiling:
        pixels = min(pixels, VAE_TILED_PIXELS)
    decode = VAE_DECODE_BYTES_PER_PIXEL * pixels * workload.vae_channels / 512
    # bf16 outputs held across steps (measured with Pyramid Attention Broadcast: 8.6 GiB more).
    denoise += workload.cached_outputs * batch * workload.tokens * workload.hidden * 2
    return denoise / GIB, decode / GIB


def estimate(plan: str, weights: dict[str, int], workload: Workload, config: MemoryConfig) -> Estimate:
    """Peak GPU memory (as the allocator reserves it) and host memory of `plan`, in GiB."""
    text, transformer, vae = (weights[k] / GIB for k in ("text_encoder", "transformer", "vae"))
    if config.fp8_weights:
        transformer /= 2
    streamed = plan in STREAMED_PLANS
    denoise, decode = activation_gib(workload, config.vae_tiling, streamed)
    # One streamed block (CogVideoX-5B has 42; diffusers streams them one at a time), with room for
    # the weights outside the blocks, which stay resident (~150 MB).
    block = transformer / 40
    layer = text / 24
    gpu = {
        "none": text + transformer + vae + max(denoise, decode),
        "text_offload": transformer + vae + max(denoise, decode, 2 * layer),
        "group_offload": vae + 3 * block + max(denoise, decode, 2 * layer),
        "model_cpu_offload": max(text, transformer + denoise, vae + decode),
        "sequential_cpu_offload": max(denoise, decode) + 2 * block,
    }[plan]
    sizes = {"text_encoder": text, "transformer": transformer, "vae": vae}
    host = sum(sizes[name] for name in HOST_RESIDENT[plan])
    return Estimate(plan, round(gpu * FRAGMENTATION + HEADROOM_GIB, 2), round(host, 2))


def choose_plan(
    weights: dict[str, int],
    workload: Workload,
    config: MemoryConfig,
    budget_gib: float,
    host_gib: float,
    local_world_size: int,
) -> Choice:
    """The fastest plan that fits both the GPU budget and the host's memory.

    With memory.share_host_weights, the processes of a host hold one copy of a plan's host-resident
    weights between them; otherwise each process needs its own, out of an equal share of the host.
    """
    processes = max(1, local_world_size)
    shared = config.share_host_weights and processes > 1
    estimates = tuple(estimate(p, weights, workload, config) for p in PLANS)
    by_plan = {e.plan: e for e in estimates}
    host = {p: _host_need(by_plan[p], shared, processes, host_gib) for p in PLANS}
    for plan in LADDER:
        e = by_plan[plan]
        if e.gpu_gib <= budget_gib and host[plan][0]:
            faster = [p for p in LADDER[: LADDER.index(plan)]]
            why = "; ".join(_why_not(by_plan[p], budget_gib, host[p][1]) for p in faster)
            reason = (
                f"{plan}: needs ~{e.gpu_gib:.2f} GiB of the {budget_gib:.1f} GiB GPU budget and {host[plan][1]}"
                + (f" (faster plans do not fit: {why})" if why else " (the fastest plan)")
            )
            return Choice(plan, reason, estimates)
    lines = "; ".join(_why_not(by_plan[p], budget_gib, host[p][1]) for p in LADDER)
    raise UserError(
        f"No memory plan fits: {lines}. Give more GPU memory (memory.budget_gib), fewer processes per "
        f"host (accelerate launch --num_processes) or more host memory (memory.host_budget_gib)."
    )


def _host_need(e: Estimate, shared: bool, processes: int, host_gib: float) -> tuple[bool, str]:
    """Whether `e`'s host-resident weights fit this host, and the sentence that says so."""
    if shared and shareable(e.plan):
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


def next_plan_down(plan: str) -> str | None:
    """The plan to retry with after an out-of-memory error, or None at the bottom."""
    ladder = list(LADDER)
    position = ladder.index(plan) if plan in ladder else ladder.index("group_offload")
    return ladder[position + 1] if position + 1 < len(ladder) else None


def gpu_budget_gib(config: MemoryConfig, device: torch.device) -> float:
    """The GPU memory this process may use: the configured budget, else what is free now."""
    free, total = torch.cuda.mem_get_info(device)
    if config.budget_gib is None:
        return free / GIB
    if config.budget_gib * GIB > total:
        log.warning("memory.budget_gib=%.1f is more than the GPU's %.1f GiB", config.budget_gib, total / GIB)
    return min(config.budget_gib, total / GIB)


def enforce_budget(config: MemoryConfig, device: torch.device) -> None:
    """Cap PyTorch's allocator, so a run sized for a 24 GB card never uses more than 24 GB."""
    if config.budget_gib is None or not config.enforce_budget or device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, config.budget_gib * GIB / total), index)
    _collect_before_the_cap()


# Streamed weights are allocated on a side stream and freed on the compute stream, so the caching
# allocator keeps reserving new segments until it reaches the cap; there it frees every cached
# block after a device-wide synchronisation, once every few blocks. Collecting unused cached blocks
# early keeps it below the cap: measured at an 8 GiB budget, 1.452 s per step without, 1.417 with,
# 1.411 uncapped (docs/experiments/allocator_cap.json).
ALLOCATOR_SETTINGS = "garbage_collection_threshold:0.7"


def _collect_before_the_cap() -> None:
    """Have the allocator reclaim unused cached blocks once 70% of the budget is reserved."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # older torch
        setter = torch.cuda.memory._set_allocator_settings
    setter(ALLOCATOR_SETTINGS)


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


# --- applying a plan ------------------------------------------------------------------------------


def apply_plan(pipe: Any, plan: str, device: torch.device, config: MemoryConfig) -> None:
    """Place the pipeline's weights as `plan` says, undoing any earlier plan first."""
    if plan not in PLANS:
        raise UserError(f"memory={plan!r} is not a plan; choose auto or one of {', '.join(PLANS)}.")
    remove_offloading(pipe)
    _vae_switches(pipe.vae, config)
    if device.type != "cuda":
        # Plans move weights between a GPU and the host; without a GPU everything runs in place.
        pipe.to(device)
        return
    if plan == "none":
        pipe.to(device)
    elif plan == "text_offload":
        pipe.transformer.to(device)
        pipe.vae.to(device)
        _stream(pipe.text_encoder, device, "leaf_level")
    elif plan == "group_offload":
        pipe.vae.to(device)
        _stream(pipe.text_encoder, device, "leaf_level")
        _stream(pipe.transformer, device, "block_level")
    elif plan == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
    elif plan == "sequential_cpu_offload":
        pipe.enable_sequential_cpu_offload(device=device)


def remove_offloading(pipe: Any) -> None:
    """Take off every offloading hook (accelerate's and diffusers' group offloading)."""
    pipe.remove_all_hooks()
    for module in (pipe.text_encoder, pipe.transformer, pipe.vae):
        remove_offloading_hooks(module)


def remove_offloading_hooks(module: torch.nn.Module) -> None:
    """Take diffusers' group offloading hooks off `module` and everything inside it."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
    )

    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)


def _stream(module: torch.nn.Module, device: torch.device, offload_type: str) -> None:
    """diffusers' group offloading with a CUDA stream: copy the next group while this one computes.

    Works on any torch module, so the transformers text encoder streams like the transformer.
    """
    from diffusers.hooks import apply_group_offloading

    module.to("cpu")
    apply_group_offloading(
        module,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type=offload_type,
        num_blocks_per_group=1 if offload_type == "block_level" else None,
        use_stream=True,
        record_stream=True,
    )
    _keep_top_level_resident(module)


def _keep_top_level_resident(module: torch.nn.Module) -> None:
    """Keep the weights outside the streamed groups on the GPU for good.

    Group offloading puts the top-level leftovers (CogVideoX's patch and time embeddings, learned
    positional embedding, output norm and projection: about 150 MB) in a group of their own that
    is moved with blocking copies from pageable memory before and after every forward. The copy
    back waits for the GPU to finish the step, so the host stops running ahead once per step; on an
    H100 that cost 0.2 s of a 1.6 s step (docs/experiments/step_profile.json). Onloaded once and
    never offloaded, the group's per-step onload finds its tensors in place and moves nothing.
    """
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None
    if hook is None:
        return
    hook.group.onload_()
    hook.group.offload_ = lambda: None


def _vae_switches(vae: Any, config: MemoryConfig) -> None:
    (vae.enable_slicing if config.vae_slicing else vae.disable_slicing)()
    (vae.enable_tiling if config.vae_tiling else vae.disable_tiling)()
