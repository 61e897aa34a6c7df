"""FlashAttention-4 (the registry's `flash-attn-4`, JIT-compiled through the CUTLASS DSL) as an attention kernel.

`speed.attention=fa4` asks for it; `auto` takes it only at the head sizes where it was measured faster
than cuDNN on this GPU generation (FASTER_HEAD_DIMS, from scripts/attention_bench.py). Without the
package, on a GPU it does not support, or at a call it cannot take (a mask, say), attention stays
on cuDNN: one log line, never an error.

The kernel runs as one torch custom op with a fake (shape-only) implementation, so regional
torch.compile treats it as one opaque call instead of tracing into the DSL's Python.

Two routes into a transformer (`use_in`):
* processors on diffusers' attention dispatcher (Wan, LTX-Video, HunyuanVideo-1.5): diffusers
  0.42.1 knows backends only by its own enum and reaches FA4 only through its kernels hub
  (unreachable offline), so this module lends the kernel that enum's FA4 slot and sets it on the
  processors directly; every private diffusers name it uses is in `_dispatcher()`;
* processors that call SDPA themselves (CogVideoX's): each is wrapped so that, inside its call, a
  torch-function mode sends the SDPA calls FA4 can take to it. The mode is entered inside the
  compiled block, so dynamo traces it and the graph holds the custom op (checked on CPU with
  fullgraph=True; not yet timed on a GPU).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

# Head sizes at which FA4 beat cuDNN, per compute capability (major), measured in one run on an H200
# (docs/experiments/fa4_attention.json; flash-attn-4 4.0.0b36, cuDNN 9.19): at 64, 576 against 430
# TFLOP/s (CogVideoX-5B's shape) and 516 against 450 (LTX-Video 2B); at 128, 679 against 576 (Wan 2.1
# 480p), 652 against 567 (HunyuanVideo-1.5 480p), 682 against 649 (LTX-Video 13B). `auto` uses FA4
# only at these; elsewhere, and on GPUs not measured, cuDNN.
FASTER_HEAD_DIMS: dict[int, frozenset[int]] = {9: frozenset({64, 128})}
# Compute capabilities (major) whose kernels flash-attn-4 ships and that we accept for speed.attention=fa4.
SUPPORTED_MAJORS = (9, 10, 11)
OP_NAME = "batch_runner::fa4_attention"


_import_error: list[str] = []  # why the last import failed, for the log line


# Importing flash-attn-4 imports quack, whose RMS-norm module builds its configurations at import for
# the GPU's compute capability, asked of torch: that starts CUDA's driver (measured on an H100,
# flash-attn-4 4.0.0b36 with quack-kernels 0.6.5: torch.cuda.is_initialized() after the import),
# and a process that forks its runs (the warm server) then cannot import it ahead. Unless
# quack's own override, meant for compiling without a GPU, names the capability.
QUACK_ARCH = "QUACK_ARCH"


def import_environment(capabilities: set[tuple[int, int]]) -> dict[str, str]:
    """The environment under which importing flash-attn-4 leaves CUDA's driver unstarted, given
    the host's GPUs' compute capabilities as read without starting it (NVML): quack's override set
    to theirs, where they all have the same one; else, or where the user set it, nothing. A run
    forked afterwards holds what its own import would have built."""
    if len(capabilities) != 1 or QUACK_ARCH in os.environ:
        return {}
    ((major, minor),) = capabilities
    return {QUACK_ARCH: f"{major}{minor}"}


@functools.cache
def _load() -> Callable | None:
    """The package's forward, or None when it cannot be imported (not installed, a broken CUDA DSL)."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as error:  # ImportError, or the DSL failing to load its native libraries
        _import_error[:] = [f"{type(error).__name__}: {error}"]
        return None
    return flash_attn_func


def unavailable_reason(device: torch.device) -> str | None:
    """Why FA4 cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return f"{device.type} is not a CUDA device"
    if _load() is None:
        why = f" ({_import_error[0]})" if _import_error else ""
        return f"flash-attn-4 is not installed or does not import{why} (README: FlashAttention-4)"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in SUPPORTED_MAJORS:
        return f"its kernels do not support this GPU (compute capability {major}.{minor})"
    return None


def chosen(name: str, head_dim: int | None, device: torch.device, context_parallel: bool = False) -> bool:
    """Whether the transformer's attention runs on FA4 for speed.attention=`name`.

    `fa4` asks for it and falls back with one log line when it cannot run; `auto` takes it silently
    only where it was measured faster at this head size on this GPU generation.
    """
    if name not in ("fa4", "auto") or device.type != "cuda":
        return False
    if name == "auto":
        major = torch.cuda.get_device_capability(device)[0]
        faster = head_dim in FASTER_HEAD_DIMS.get(major, frozenset())
        return faster and not context_parallel and unavailable_reason(device) is None
    reason = unavailable_reason(device) or (
        "context parallelism needs cuDNN's log-sum-exp" if context_parallel else None
    )
    if reason:
        log.warning("speed.attention=fa4: %s; attention runs on cuDNN instead", reason)
        return False
    return True


_failure: list[str] = []  # why the kernel failed at a call, once it has: SDPA takes every call after


def failure() -> str | None:
    """Why FA4 failed at a call in this process (its calls run on SDPA since), or None."""
    return _failure[0] if _failure else None


@torch.library.custom_op(OP_NAME, mutates_args=())
def fa4_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Non-causal attention, (batch, tokens, heads, head_dim) in and out, through FA4's forward.

    A call the kernel fails (its JIT compile, its on-disk kernel cache's lock, an unforeseen shape)
    runs on PyTorch's SDPA instead, as does every later one, with one warning: attention stays on
    cuDNN rather than failing every row. Running out of memory is the memory plan's to handle.

    The inputs go in as they come: the package copies only those whose strides it cannot read
    (`maybe_contiguous`), and a fused projection's values (every token's q, k and v side by side)
    it reads in place, where a `.contiguous()` here copied them once per call.
    """
    kernel = None if _failure else _load()
    if kernel is not None:
        try:
            out = kernel(query, key, value, softmax_scale=scale)
            return out[0] if isinstance(out, tuple) else out  # (out, lse): lse is None unless asked for
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            _failure[:] = [f"{type(error).__name__}: {str(error)[:200]}"]
            log.warning("FlashAttention-4 failed (%s); attention runs on SDPA (cuDNN) from here on", _failure[0])
    return _sdpa(query, key, value, scale=scale).contiguous()


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **arguments: Any) -> torch.Tensor:
    """Attention of (batch, tokens, heads, head_dim) tensors on PyTorch's SDPA, cuDNN first: where
    FA4 cannot take a call, or has failed. `arguments`: SDPA's own (mask, causal, scale, ...)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    with sdpa_kernel(
        [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    ):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, **arguments)
    return out.transpose(1, 2)


@fa4_attention.register_fake
def _fa4_attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def dispatcher_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config: Any = None,
) -> torch.Tensor:
    """diffusers' backend signature (tensors as (batch, tokens, heads, head_dim)): FA4 where it can,
    cuDNN's SDPA for a call it cannot take (a mask, causal, GQA, log-sum-exp, context parallelism)."""
    plain = attn_mask is None and not is_causal and not return_lse and _parallel_config is None
    if plain and dropout_p == 0.0 and query.shape[2] == key.shape[2] and query.dtype in (torch.bfloat16, torch.float16):
        return fa4_attention(query, key, value, scale if scale is not None else query.shape[-1] ** -0.5)
    arguments = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
    return _sdpa(query, key, value, enable_gqa=enable_gqa, **arguments)


def _dispatcher() -> tuple[Any, Any]:
    """diffusers' private names, in one place: the backend registry and the enum slot FA4 takes."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry, AttentionBackendName.FLASH_4_HUB


def register() -> Any:
    """Put the kernel in diffusers' registry under its FA4 name; returns that name."""
    registry, name = _dispatcher()
    registry.register(name, constraints=[], supports_context_parallel=False)(dispatcher_attention)
    return name


def _sdpa_fits(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> float | None:
    """The softmax scale for an SDPA call (b, h, s, d) FA4 can take as it is, else None."""
    plain = attn_mask is None and dropout_p == 0.0 and not is_causal and query.dim() == 4
    if not plain or query.shape[1] != key.shape[1] or query.dtype not in (torch.bfloat16, torch.float16):
        return None
    return scale if scale is not None else query.shape[-1] ** -0.5


def _qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
    return query, key, value


class SdpaToFa4(TorchFunctionMode):
    """Inside it, `F.scaled_dot_product_attention` calls that FA4 can take run on FA4; others run as called."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            scale = _sdpa_fits(*args, **kwargs)
            if scale is not None:
                query, key, value = _qkv(*args, **kwargs)
                out = fa4_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale)
                return out.transpose(1, 2)
        return func(*args, **kwargs)


class SdpaProcessorOnFa4:
    """Runs an attention processor that calls SDPA itself with those calls on FA4 (`SdpaToFa4`)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor


@functools.cache
def _wrapper_class(processor_class: type) -> type:
    """A `SdpaProcessorOnFa4` whose `__call__` has the processor's signature: diffusers drops the
    keyword arguments a processor's signature does not name, so a bare `**kwargs` would lose them."""
    own = inspect.signature(processor_class.__call__)

    def __call__(self: SdpaProcessorOnFa4, *args: Any, **kwargs: Any) -> Any:
        with SdpaToFa4():
            return self.processor(*args, **kwargs)

    __call__.__signature__ = own  # includes self: a bound method drops it, as for the processor's own
    return type(f"{processor_class.__name__}OnFa4", (SdpaProcessorOnFa4,), {"__call__": __call__})


def use_in(transformer: torch.nn.Module) -> int:
    """Route every attention of `transformer` to FA4; returns how many attention layers were set.

    Dispatcher processors get the backend directly, as `set_attention_backend` does after its checks
    (which insist on the kernels-hub package for this name) and without making FA4 the process-wide
    default. Processors that call SDPA themselves are wrapped (`SdpaProcessorOnFa4`).
    """
    name = register()
    count = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is None or isinstance(processor, SdpaProcessorOnFa4):
            continue
        if hasattr(processor, "_attention_backend"):
            processor._attention_backend = name
        elif hasattr(module, "set_processor"):
            module.set_processor(_wrapper_class(type(processor))(processor))
        else:
            continue
        count += 1
    return count
