"""Weight placement: applying a memory plan to a built pipeline (offloading hooks, pinned streams,
the VAE's decode switches) and capping the allocator at the budget.

Which plan, and the settings it runs with, the planner decides (batch_runner.replica.planner); this
module only carries out its `Placement`.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from batch_runner import upstream
from batch_runner.errors import UserError
from batch_runner.families.base import DECODER, DENOISER
from batch_runner.replica.planner import GIB, PLANS, Placement, applies, host_resident


def enforce_budget(cap_gib: float | None, device: torch.device, planned_gib: float | None = None) -> str | None:
    """Cap PyTorch's allocator at `cap_gib`, so a run sized for a 24 GB card never uses more than 24 GB,
    and have it reclaim unused cached blocks above what the run's plans planned to reserve
    (`planned_gib`, the largest of their estimates). Returns the allocator settings given, if any."""
    if cap_gib is None or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), index)
    settings = allocator_settings(cap_gib, planned_gib)
    if settings is not None:
        upstream.set_allocator_settings(settings)
    return settings


# Streamed weights are allocated on a side stream and freed on the compute stream, so the caching
# allocator keeps reserving new segments until it reaches the cap; there it frees every cached
# block after a device-wide synchronisation, once every few blocks. Collecting unused cached blocks
# early keeps it below the cap: measured at an 8 GiB budget, 1.452 s per step without, 1.417 with
# 0.7 of the cap, 1.411 uncapped (docs/experiments/allocator_cap.json).
GC_THRESHOLD = 0.7
# The collection must start above what the plan holds live: past the threshold, every new segment
# first collects unused cached blocks, and where the live tensors alone are above it that never
# brings the pool back under, so it runs again at every new segment. Measured on an H100
# (docs/experiments/2026-12-05i): LTX-2's group_offload, planned 12.17 GiB of a 16 GiB cap, took
# 1.67 s a step at 0.7 and 1.15 at 0.761 (1.10 under 24 GiB), with about as many driver calls at
# either (the time differed, not their count); Kandinsky 5 Lite's whole-frame decode under 48 GiB
# took 14.5 s at 0.7 and 6.6 at 0.97. Hence the threshold is the plan's planned share of the cap
# where that is higher, and at most this (torch refuses 1.0).
GC_THRESHOLD_MAX = 0.99
# Where torch reads a user's allocator settings from at start-up (the newer name first).
ALLOCATOR_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def gc_threshold(cap_gib: float, planned_gib: float | None) -> float:
    """The share of the cap above which the allocator reclaims unused cached blocks: GC_THRESHOLD, or
    the plan's planned peak (as reserved) over the cap where that is higher."""
    share = 0.0 if planned_gib is None else planned_gib / cap_gib
    return round(min(GC_THRESHOLD_MAX, max(GC_THRESHOLD, share)), 3)


def allocator_settings(cap_gib: float, planned_gib: float | None) -> str | None:
    """The settings to give the allocator under a budget, or None where the user's environment sets
    a garbage-collection threshold of its own (theirs stands)."""
    if any("garbage_collection_threshold" in os.environ.get(name, "") for name in ALLOCATOR_ENV):
        return None
    return f"garbage_collection_threshold:{gc_threshold(cap_gib, planned_gib):g}"


# --- applying a plan ------------------------------------------------------------------------------


class HostCopies:
    """The host tensors of components that move between the GPU and the host as rows change plans.

    A run whose row shapes need different plans switches placement between them. A component that
    goes to the GPU keeps its host tensors here (references: the host-shared, pinned copy), and
    coming back to the host it is pointed at them again instead of copied: no new private copy, no
    new pinning, no copy back over the bus. Only the components named in `keep` (those some plan of
    the run keeps on the host) are kept: a one-plan run keeps nothing.
    """

    def __init__(self, keep: tuple[str, ...] = ()) -> None:
        self.keep = set(keep)
        self.saved: dict[str, dict[str, torch.Tensor]] = {}

    def to_device(self, name: str, module: torch.nn.Module, device: torch.device) -> None:
        if name in self.keep:
            self.saved.setdefault(name, {}).update(_host_tensors(module))
        module.to(device)

    def to_host(self, name: str, module: torch.nn.Module) -> None:
        saved = self.saved.get(name, {})
        _point_back(module, saved)
        for key, tensor in _tensors(module):
            if key not in saved and tensor.device.type != "cpu":
                tensor.data = tensor.data.cpu()


def _host_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s tensors on the host, by name: references, to point it back at (_point_back)."""
    return {key: t.data for key, t in _tensors(module) if t.device.type == "cpu"}


def _point_back(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Point each of `module`'s tensors named in `saved` at that host tensor again (no copy)."""
    for key, tensor in _tensors(module):
        if key in saved:
            _rebind(module, key, tensor, saved[key])


def _rebind(module: torch.nn.Module, key: str, tensor: torch.Tensor, host: torch.Tensor) -> None:
    """Point `tensor` (module's `key`) at `host`: in place where torch allows it (a GPU tensor),
    else (the meta device) as a new parameter or buffer of its owner."""
    try:
        tensor.data = host
    except RuntimeError:
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        if isinstance(tensor, torch.nn.Parameter):
            setattr(owner, leaf, torch.nn.Parameter(host, requires_grad=tensor.requires_grad))
        else:
            owner.register_buffer(leaf, host)


def _tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def apply_plan(
    pipe: Any, placement: Placement, device: torch.device, roles: dict[str, str], copies: HostCopies | None = None
) -> None:
    """Place the pipeline's weights as `placement.plan` says, undoing any earlier plan first.

    `roles` names the pipeline's components (family.components): encoders stream layer by layer,
    denoisers block by block, and the VAE stays on the GPU under every plan of our own but
    full_offload, which streams it layer by layer too.
    """
    plan = placement.plan
    copies = copies or HostCopies()
    if plan not in PLANS or not applies(plan, roles):
        usable = ", ".join(p for p in PLANS if applies(p, roles))
        raise UserError(f"memory={plan!r} is not a plan for this model; choose auto or one of {usable}.")
    remove_offloading(pipe, roles)
    set_vae_decode(pipe.vae, placement)
    if device.type != "cuda":
        # Plans move weights between a GPU and the host; without a GPU everything runs in place.
        pipe.to(device)
        return
    on_host = host_resident(plan, roles)
    for name in roles:
        module = getattr(pipe, name)
        if name in on_host:
            copies.to_host(name, module)
        else:
            copies.to_device(name, module, device)
    if plan == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
    elif plan == "sequential_cpu_offload":
        pipe.enable_sequential_cpu_offload(device=device)
        for name in roles:
            _keep_attention_pools_resident(getattr(pipe, name), device)
    else:
        for name, role in roles.items():
            if name in on_host:
                if role == DECODER:
                    stream_layers(getattr(pipe, name), device)
                else:
                    _stream(getattr(pipe, name), device, "block_level" if role == DENOISER else "leaf_level")


def remove_offloading(pipe: Any, roles: dict[str, str]) -> None:
    """Take off every offloading hook (accelerate's and diffusers' group offloading)."""
    pipe.remove_all_hooks()
    for name in roles:
        remove_offloading_hooks(getattr(pipe, name))


def remove_offloading_hooks(module: torch.nn.Module) -> None:
    """Take diffusers' group offloading hooks off `module` and everything inside it."""
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in upstream.group_offloading_hook_names():
        registry.remove_hook(name, recurse=True)


def _stream(module: torch.nn.Module, device: torch.device, offload_type: str, prefetch: bool = True) -> None:
    """diffusers' group offloading with a CUDA stream: copy the next group while this one computes.

    Works on any torch module, so the transformers text encoder streams like the transformer.
    Without `prefetch` (a VAE, called through `encode` and `decode`, never its forward) each layer
    is copied in as it is called, from pinned memory: upstream.drop_prefetch_tracing says why.
    On a device without streams (the CPU, where plans are not applied) the copies are plain ones.
    """
    from diffusers.hooks import apply_group_offloading

    streams = device.type == "cuda"
    module.to("cpu")
    apply_group_offloading(
        module,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type=offload_type,
        num_blocks_per_group=1 if offload_type == "block_level" else None,
        use_stream=streams,
        record_stream=streams,
    )
    if not prefetch:
        upstream.drop_prefetch_tracing(module)
    _keep_top_level_resident(module)
    if offload_type == "leaf_level":
        _keep_attention_pools_resident(module, device)


def stream_layers(module: torch.nn.Module, device: torch.device) -> None:
    """Stream a decoder layer by layer, as full_offload does (apply_plan)."""
    _stream(module, device, "leaf_level", prefetch=False)


@contextlib.contextmanager
def streamed_anew(
    modules: Sequence[torch.nn.Module], device: torch.device, inner: contextlib.AbstractContextManager
) -> Iterator[None]:
    """Run `inner`, a context that casts some of `modules` (decoders streamed layer by layer, as under
    full_offload), with their layers streamed from the cast weights.

    Group offloading onloads each layer from the host copies it pinned when it was applied, which a
    cast of the module does not reach: under the same hooks a VAE cast to float32 would still be
    handed its bfloat16 copies, and its float32 inputs would meet them. So the hooks come off for
    the duration and go on again over the cast weights. Afterwards each module points at its host
    tensors from before (the host-shared, pinned copy: nothing copied or pinned anew) and streams
    them again, and the pinned copies of the cast weights go back to the system.
    """
    before = [_host_tensors(m) for m in modules]
    for module in modules:
        remove_offloading_hooks(module)
    try:
        with inner:
            try:
                for module in modules:
                    stream_layers(module, device)
                yield
            finally:
                for module in modules:
                    remove_offloading_hooks(module)
    finally:
        for module, host in zip(modules, before, strict=True):
            _point_back(module, host)
            stream_layers(module, device)
        upstream.empty_host_cache()


def _keep_top_level_resident(module: torch.nn.Module) -> None:
    """Keep the weights outside the streamed groups on the GPU for good.

    Group offloading puts the top-level leftovers (CogVideoX's patch and time embeddings, learned
    positional embedding, output norm and projection: about 150 MB) in a group of their own that
    is moved with blocking copies from pageable memory before and after every forward. The copy
    back waits for the GPU to finish the step, so the host stops running ahead once per step; on an
    H100 that cost 0.2 s of a 1.6 s step (docs/experiments/step_profile.json). Onloaded once and
    never offloaded, the group's per-step onload finds its tensors in place and moves nothing.
    """
    hook = upstream.group_offloading_hook(module)
    if hook is not None:
        upstream.keep_group_onloaded(hook)


def _keep_attention_pools_resident(module: torch.nn.Module, device: torch.device) -> None:
    """Keep each of torch's `MultiheadAttention` layers on the GPU, unstreamed.

    Leaf-level streaming fetches a layer's weights when the layer is called, but MultiheadAttention
    reads its `out_proj` weight without calling `out_proj`: streamed, that weight stays on the host
    and the forward fails (seen on an H100 with HunyuanVideo-1.5's SigLIP image encoder, whose
    pooling head is one: 0.03 GiB at full size). diffusers' sequential CPU offload (accelerate's
    per-layer hooks) leaves it on the meta device the same way: its recipe fails on HunyuanVideo-1.5.
    """
    from accelerate.hooks import remove_hook_from_module

    for layer in module.modules():
        if isinstance(layer, torch.nn.MultiheadAttention):
            remove_offloading_hooks(layer)
            remove_hook_from_module(layer, recurse=True)  # accelerate's: puts the offloaded weights back
            layer.to(device)


def set_vae_decode(vae: Any, placement: Placement) -> None:
    """The VAE's decode as the placement says: whole frames, or tiles of the planned size (None: the
    VAE's own, put back where an earlier placement of this replica made them smaller)."""
    (vae.enable_slicing if placement.vae_slicing else vae.disable_slicing)()
    (vae.enable_tiling if placement.vae_tiling else vae.disable_tiling)()
    if placement.vae_tiling and (placement.vae_tile is not None or vae in _OWN_TILE_SIDE):
        set_vae_tile(vae, placement.vae_tile)


# The tile side each VAE had before set_vae_tile first changed it: `enable_tiling()` keeps the last
# tile set, so rows of another shape planned with the VAE's own tile would decode in the smaller one.
_OWN_TILE_SIDE: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def set_vae_tile(vae: Any, side: int | None) -> None:
    """Decode in tiles of `side` x `side` pixels (None: the VAE's own), overlapping as its own do.

    HunyuanVideo-1.5's VAE keeps its tile in pixels and in latents, and its `enable_tiling` does not
    recompute one from the other; the ratio of the two it holds is its compression.
    """
    own = _OWN_TILE_SIDE.setdefault(vae, vae.tile_sample_min_height)
    side = own if side is None else side
    ratio = vae.tile_sample_min_height // vae.tile_latent_min_height
    vae.tile_latent_min_height = vae.tile_latent_min_width = side // ratio
    vae.tile_sample_min_height = vae.tile_sample_min_width = side
