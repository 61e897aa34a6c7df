"""The private names of torch, diffusers and accelerate that batch_runner relies on, in one place.

Each is an internal of the library, free to change in any release. Reaching them only through this
module means an upgrade is checked here: `MIRRORS` says which version each name was read from, and
tests/test_upstream.py fails when the installed versions leave that range or a name has gone.
Model families (batch_runner/families/) reach a few of their own: the shared ones are listed here,
those that name a family's own classes by the family (`Family.mirrors`); the same test checks both.

Imports happen inside the functions: nothing here is loaded before it is used.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# The versions the names below were read from (torch 2.11 on the GPU machines, 2.13 on CPU-only ones).
TORCH_VERSIONS = ("2.11", "2.12", "2.13")
DIFFUSERS_VERSIONS = ("0.42.1",)
ACCELERATE_VERSIONS = ("1.16",)


@dataclass(frozen=True)
class Mirror:
    """One private name: where it lives, the library version it mirrors, and what we use it for."""

    library: str  # torch | diffusers | accelerate
    path: str  # module path, then attributes after a colon: "pkg.mod:Class.attr"
    versions: tuple[str, ...]
    why: str


MIRRORS = (
    Mirror("torch", "torch._dynamo.config:cache_size_limit", TORCH_VERSIONS, "room for compiled block variants"),
    Mirror("torch", "torch._inductor.config:fx_graph_cache", TORCH_VERSIONS, "the compile cache across runs"),
    Mirror("torch", "torch._inductor.config:compile_threads", TORCH_VERSIONS, "compile workers per process"),
    Mirror(
        "torch",
        "torch._inductor.config:unsafe_marked_cacheable_functions",
        TORCH_VERSIONS,
        "cache graphs that call sdpa_kernel's helpers",
    ),
    Mirror("torch", "torch._functorch.config:enable_autograd_cache", TORCH_VERSIONS, "the compile cache across runs"),
    Mirror("torch", "torch._C:_accelerator_setAllocatorSettings", TORCH_VERSIONS, "allocator garbage collection"),
    Mirror("torch", "torch.distributed.distributed_c10d:_get_default_store", TORCH_VERSIONS, "the shared row counter"),
    *(
        Mirror("torch", f"torch.nn.attention:{name}", TORCH_VERSIONS, "helpers dynamo records for sdpa_kernel")
        for name in ("_backend_from_string", "_cur_sdpa_kernel_backends", "_sdpa_kernel", "_sdpa_kernel_variadic")
    ),
    *(
        Mirror("diffusers", f"diffusers.hooks.group_offloading:{name}", DIFFUSERS_VERSIONS, "remove every offload hook")
        for name in ("_GROUP_OFFLOADING", "_LAYER_EXECUTION_TRACKER", "_LAZY_PREFETCH_GROUP_OFFLOADING")
    ),
    Mirror("diffusers", "diffusers.hooks.group_offloading:ModuleGroup.onload_", DIFFUSERS_VERSIONS, "pin top level"),
    Mirror("diffusers", "diffusers.hooks.group_offloading:ModuleGroup.offload_", DIFFUSERS_VERSIONS, "pin top level"),
    Mirror(
        "diffusers",
        "diffusers.hooks.group_offloading:_apply_group_offloading_block_level",
        DIFFUSERS_VERSIONS,
        "block_level_lists restates which children it streams",
    ),
    Mirror("diffusers", "diffusers:DiffusionPipeline._execution_device", DIFFUSERS_VERSIONS, "the generator's device"),
    Mirror(
        "diffusers",
        "diffusers:ModelMixin._keep_in_fp32_modules",
        DIFFUSERS_VERSIONS,
        "built weights cast as from_pretrained casts them",
    ),
    *(
        Mirror("diffusers", f"diffusers.models.attention_dispatch:AttentionBackendName.{name}", DIFFUSERS_VERSIONS, why)
        for name, why in (
            ("_NATIVE_CUDNN", "speed.attention=cudnn"),
            ("_NATIVE_FLASH", "speed.attention=flash"),
            ("_NATIVE_EFFICIENT", "speed.attention=efficient"),
            ("_NATIVE_MATH", "speed.attention=math"),
        )
    ),  # named as strings in speed.DISPATCHER_BACKENDS
    Mirror("torch", "torch._dynamo:maybe_mark_dynamic", TORCH_VERSIONS, "speed.SteadyInputs: prompts of any length"),
    # Used by model families (batch_runner/families/), which reach them directly:
    Mirror(
        "diffusers",
        "diffusers.models.attention:AttentionModuleMixin._supports_qkv_fusion",
        DIFFUSERS_VERSIONS,
        "ltx2: its attention is left unfused",
    ),
    Mirror(
        "diffusers",
        "diffusers.models.attention_dispatch:_AttentionBackendRegistry",
        DIFFUSERS_VERSIONS,
        "families.base: the transformer's attention backend",
    ),
    Mirror(
        "diffusers",
        "diffusers.models.attention:AttentionModuleMixin._supports_qkv_fusion",
        DIFFUSERS_VERSIONS,
        "kandinsky5: its attention says it cannot fuse (diffusers' fusing misses its projections)",
    ),
)
# Attributes the libraries set on a module they hook: not importable, so the test adds a hook and looks.
HOOK_ATTRIBUTES = (
    Mirror("diffusers", "torch.nn.Module._diffusers_hook", DIFFUSERS_VERSIONS, "a module's diffusers hooks"),
    Mirror("accelerate", "torch.nn.Module._hf_hook", ACCELERATE_VERSIONS, "a module's accelerate hooks"),
)


# --- torch ---------------------------------------------------------------------------------------


def raise_compile_cache_limit(at_least: int) -> None:
    """Let dynamo keep `at_least` compiled variants of one code object before it falls back to eager."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, at_least)


def size_may_vary(tensor: Any, dim: int) -> None:
    """Tell dynamo that `tensor`'s size at `dim` varies between calls: graphs compiled from here on
    take it as a symbol (it keeps a constant where the graph needs one, instead of failing)."""
    import torch._dynamo

    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def inductor_config() -> Any:
    """torch._inductor.config: the compile cache, its workers and what it may cache."""
    import torch._inductor.config

    return torch._inductor.config


def functorch_config() -> Any:
    """torch._functorch.config: the autograd cache that sits beside inductor's."""
    import torch._functorch.config

    return torch._functorch.config


# What dynamo records for `with sdpa_kernel(backends, set_priority=...)` inside a compiled region:
# torch.nn.attention's private helpers.
SDPA_CONTEXT_HELPERS = ("_backend_from_string", "_cur_sdpa_kernel_backends", "_sdpa_kernel", "_sdpa_kernel_variadic")


def set_allocator_settings(settings: str) -> None:
    """PYTORCH_CUDA_ALLOC_CONF's settings, changed in a running process."""
    import torch

    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # older torch
        setter = torch.cuda.memory._set_allocator_settings
    setter(settings)


def empty_host_cache() -> None:
    """Hand the pinned host blocks torch's host allocator keeps cached back to the system.

    Public from torch 2.12 (`torch.accelerator.empty_host_cache`); torch 2.11, the GPU machines',
    has only the private `torch._C._host_emptyCache` (read from 2.11, gone by 2.13, so the fallback
    is not a MIRRORS entry, as `set_allocator_settings`' is not). A torch with neither keeps them.
    """
    import torch

    if not torch.cuda.is_available():
        return
    empty = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def default_store() -> Any:
    """The process group's key-value store (the TCPStore accelerate started), for counters every rank shares."""
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


# --- diffusers -----------------------------------------------------------------------------------


def group_offloading_hook_names() -> tuple[str, ...]:
    """The names group offloading registers its hooks under, to take them all off again."""
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
    )

    return (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING)


def drop_prefetch_tracing(module: Any) -> None:
    """Take off the hooks with which group offloading learns `module`'s layer order for prefetching,
    leaving each layer to load as it is called (as it does while learning). That order is learnt
    in `module.forward` and set up after it returns; a component that is never called through its
    forward (a VAE: pipelines call `encode` and `decode`) would otherwise never finish learning, and
    its list of calls would grow by every layer's every call. Mirrors diffusers 0.42.1."""
    from diffusers.hooks.group_offloading import _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING

    registry = hook_registry(module)
    if registry is not None:
        for name in (_LAZY_PREFETCH_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER):
            registry.remove_hook(name, recurse=True)


def group_offloading_hook(module: Any) -> Any | None:
    """The group-offloading hook diffusers put on `module` itself, or None."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    registry = hook_registry(module)
    return registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None


def block_level_lists(module: Any) -> list[Any]:
    """The children of `module` that diffusers' block-level group offloading streams, block by block.

    As `_apply_group_offloading_block_level` of diffusers 0.42.1 (without `block_modules`): every
    direct child that is a `ModuleList` or `Sequential` becomes groups of its blocks, streamed in
    turn; the other children form one group, which placement keeps on the GPU. So a transformer's
    second list (Kandinsky 5's text blocks, Cosmos' cross-attention projection) streams too.
    """
    import torch

    return [child for child in module.children() if isinstance(child, torch.nn.ModuleList | torch.nn.Sequential)]


def keep_group_onloaded(hook: Any) -> None:
    """Onload the hook's group once and never offload it again."""
    hook.group.onload_()
    hook.group.offload_ = lambda: None


def hook_registry(module: Any) -> Any | None:
    """diffusers' HookRegistry on `module`, or None when no diffusers hook was ever added."""
    return getattr(module, "_diffusers_hook", None)


def execution_device(pipe: Any) -> Any:
    """The device a diffusers pipeline runs its models on, offloading hooks considered."""
    return pipe._execution_device


def cast_as_loaded(component: Any, dtype: Any) -> Any:
    """`component` in `dtype` as `from_pretrained(torch_dtype=dtype)` would load it: the submodules its
    class keeps in float32 (`_keep_in_fp32_modules`: Kandinsky 5's time embeddings and modulation)
    stay in float32. A plain `.to(dtype)` casts them too, and their float32 inputs then meet bf16
    weights. Matches diffusers 0.42's rule: a weight whose dotted name holds one of those names."""
    import torch
    from diffusers import ModelMixin

    component.to(dtype=dtype)
    # transformers' models have rules of their own (float16 only): only diffusers' models are kept.
    keep = (component._keep_in_fp32_modules or ()) if isinstance(component, ModelMixin) else ()
    if keep and dtype in (torch.float16, torch.bfloat16):
        for name, parameter in component.named_parameters():
            if any(part in keep for part in name.split(".")):
                parameter.data = parameter.data.to(torch.float32)
    return component


# --- accelerate ----------------------------------------------------------------------------------


def has_accelerate_hook(module: Any) -> bool:
    """Whether accelerate's hooks (model or sequential CPU offload) wrap `module`."""
    return hasattr(module, "_hf_hook")


@contextlib.contextmanager
def weights_on_device(module: Any) -> Iterator[None]:
    """`module`'s own weights where its forward would see them, for code that reads them directly.

    Sequential CPU offload (accelerate's AlignDevicesHook) keeps a layer's weights on the meta
    device and loads them only around that layer's forward; a processor that slices `weight`
    itself (a fused projection applied to two inputs) must ask the hook the same way.
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        yield
        return
    hook.pre_forward(module)
    try:
        yield
    finally:
        hook.post_forward(module, None)


# --- checking the mirrors ------------------------------------------------------------------------


def resolve(path: str) -> Any:
    """The object a Mirror's path names; raises ImportError or AttributeError when it has gone."""
    module, _, attributes = path.partition(":")
    found: Any = importlib.import_module(module)
    for name in attributes.split("."):
        found = getattr(found, name)
    return found
