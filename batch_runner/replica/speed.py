"""Speed that leaves outputs unchanged (up to bf16 noise), and opt-in approximations that do not.

* fused QKV projections (diffusers' own `fuse_qkv_projections`): one matmul instead of three, and
  the separate projections it leaves behind are dropped (2.2 GiB on CogVideoX-5B);
* regional torch.compile of the repeated transformer blocks (the family says which they are): each
  block's forward is compiled in place, under any offloading hook; all blocks share one compiled
  graph, so compilation happens once;
* the attention kernel: the family applies the choice, through diffusers' attention dispatcher
  (`set_attention_backend`) where its transformer uses it, or around each SDPA call where it does
  not (CogVideoX);
* no host synchronisation in the denoising loop: the scheduler's timesteps stay on the host (its
  arithmetic and dynamic CFG's `t.item()` then never wait for the GPU) and a forward pre-hook hands
  the transformer its timestep on the GPU;
* approximations (speed.cache): diffusers' First Block Cache or Pyramid Attention Broadcast hooks.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from batch_runner import upstream
from batch_runner.config import SpeedConfig
from batch_runner.errors import UserError
from batch_runner.families.base import Family
from batch_runner.replica import fa4

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
    # FlashAttention-4 (batch_runner/replica/fa4.py) for the transformer; cuDNN for every other SDPA call.
    "fa4": [SDPBackend.CUDNN_ATTENTION],
}
# Fastest first on Hopper for CogVideoX's head size of 64 (measured: docs/benchmarks.md).
AUTO_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def attention_context(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA backend order for attention outside the transformer (text encoder, VAE).

    The preferred backend comes first and the others stay allowed after it: a call the preferred
    kernel cannot take (the text encoder's masked attention, say) falls back instead of raising.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(backend_order(name), set_priority=True)


def backend_order(name: str) -> list[SDPBackend]:
    """Backends in the order to try them: the preferred one first, the others as fallbacks."""
    if name == "auto":
        return AUTO_ORDER
    if name not in ATTENTION_BACKENDS:
        raise UserError(f"speed.attention={name!r} must be auto, {', '.join(ATTENTION_BACKENDS)}.")
    preferred = ATTENTION_BACKENDS[name]
    return preferred + [b for b in AUTO_ORDER if b not in preferred]


# speed.attention's names as diffusers' attention-dispatcher backends (PyTorch's own SDPA kernels).
DISPATCHER_BACKENDS = {
    SDPBackend.CUDNN_ATTENTION: "_native_cudnn",
    SDPBackend.FLASH_ATTENTION: "_native_flash",
    SDPBackend.EFFICIENT_ATTENTION: "_native_efficient",
    SDPBackend.MATH: "_native_math",
}


def prefer_attention(
    family: Family, transformer: Any, name: str, device: torch.device, context_parallel: bool = False
) -> str:
    """Give the transformer's attention the configured kernel, the family's way; returns the kernel
    it runs on (`fa4`, `cudnn`, `flash`, `efficient`, `math`, or `sdpa` off the GPU), which records
    and logs name instead of the setting.

    FA4 (speed.attention=fa4, or auto at a head size where it was measured faster) goes on top of the
    cuDNN choice, so any attention FA4 cannot take stays on cuDNN.
    """
    if device.type != "cuda":
        return "sdpa"
    order = backend_order(name)
    family.prefer_attention(transformer, order, DISPATCHER_BACKENDS[order[0]])
    chosen = DISPATCHER_BACKENDS[order[0]].removeprefix("_native_")
    head_dim = family.attention_head_size(transformer.config)
    if not fa4.chosen(name, head_dim, device, context_parallel):
        return chosen
    routed = fa4.use_in(transformer) if isinstance(head_dim, int) and head_dim % 8 == 0 else 0
    if routed:
        log.info("attention: FlashAttention-4 in %d attention layers (head size %s)", routed, head_dim)
        return "fa4"
    if name == "fa4":
        log.warning(
            "speed.attention=fa4: head size %s is not a multiple of 8; attention runs on cuDNN instead", head_dim
        )
    return chosen


def fuse_qkv(transformer: torch.nn.Module) -> int:
    """Fuse each attention's projections into one matmul; returns the bytes of weights dropped.

    diffusers' `fuse_qkv_projections` adds the fused `to_qkv` beside `to_q`, `to_k` and `to_v`
    and keeps those for `unfuse_qkv_projections`. We never unfuse, and the fused processor never
    reads them, so they go: otherwise they would sit on the GPU (resident plans) or be streamed to
    it every step (group offloading) for nothing.
    """
    if not hasattr(transformer, "fuse_qkv_projections"):  # a denoiser without diffusers' AttentionMixin
        return 0
    transformer.fuse_qkv_projections()
    dropped = 0
    for module in transformer.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for name in _replaced_projections(module):
            dropped += sum(p.numel() * p.element_size() for p in getattr(module, name).parameters())
            setattr(module, name, DroppedProjection(name))
    return dropped


class DroppedProjection(torch.nn.Module):
    """Stands where a projection was before fusion: it holds no weights and refuses to be called.

    Not None, because processors test for a projection's presence to decide what their inputs are
    (Wan's `attn.add_k_proj is not None` says that image tokens lead the context): a None there
    would silently drop Wan 2.1's image conditioning.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(f"{self.name} was fused into another projection and dropped; it cannot run")


def _replaced_projections(attention: torch.nn.Module) -> list[str]:
    """The projections a fused attention module no longer reads: those its fused layers hold."""
    names = []
    if getattr(attention, "to_qkv", None) is not None:
        names += ["to_q", "to_k", "to_v"]
    elif getattr(attention, "to_kv", None) is not None:
        names += ["to_k", "to_v"]
    if getattr(attention, "to_added_kv", None) is not None:
        names += ["add_k_proj", "add_v_proj"]
    return [n for n in names if getattr(attention, n, None) is not None]


def should_compile(config: SpeedConfig, device: torch.device) -> bool:
    if config.compile not in ("auto", "on", "off"):
        raise UserError(f"speed.compile={config.compile!r} must be auto, on or off.")
    return config.compile == "on" or (config.compile == "auto" and device.type == "cuda")


def compile_blocks(blocks: torch.nn.ModuleList, text_length_inputs: Sequence[str] = ()) -> int:
    """Compile each repeated block's own forward in place; returns how many blocks were compiled.

    Call it before a memory plan adds its hooks: diffusers' and accelerate's offloading hooks wrap
    `module.forward`, so they then wrap the compiled forward, fetch the block's weights eagerly and
    run the whole block as one graph (compiling around a hook would trace its stream work and
    break the graph; compiling the block's sub-layers one by one leaves the glue between them
    eager). Removing a hook hands the compiled forward back, so every plan keeps it.

    `text_length_inputs` (the family's) name the blocks' inputs whose second dimension is a prompt's
    token count: see SteadyInputs.
    """
    # All blocks share one graph; room for a few variants (plans, frame counts) before eager fallback.
    upstream.raise_compile_cache_limit(64)
    for block in blocks:
        registry = upstream.hook_registry(block)
        if (registry is not None and registry.hooks) or upstream.has_accelerate_hook(block):
            raise RuntimeError("compile_blocks must run before a memory plan hooks the blocks")
        block.register_forward_pre_hook(SteadyInputs(block.forward, text_length_inputs), with_kwargs=True)
        block.forward = torch.compile(block.forward, dynamic=False)
    return len(blocks)


class SteadyInputs:
    """A compiled block's forward pre-hook: inputs that one graph serves, whatever the row.

    * A tensor input that is not row-major is made so: the same values in another layout. A
      transposed token sequence (a patch embedding's `flatten(2).transpose(1, 2)`) would be kept by
      every block (a block's outputs take its inputs' layout), and every block of every step would
      read and write its tokens column-wise; diffusers 0.42 makes Wan's contiguous for that reason
      (huggingface/diffusers#14236). SkyReels-V2's and HunyuanVideo-1.5's families hand theirs
      over row-major already (`streamline`, which frees the transposed original at once); here is
      the net for any other. CogVideoX's first block gets slices of the joint text and video
      sequence: other strides than the blocks after it, so it would get a graph of its own. One
      copy per forward at most, at the first block: later blocks get row-major outputs.
    * The inputs named in `text_length_inputs` have a prompt's token count as their second dimension
      (a text not padded to a fixed length): marked dynamic there, so that each new prompt length
      does not compile the blocks again (a graph per length would recompile for nearly every row,
      and past the cache limit run them eagerly).
    """

    def __init__(self, forward: Any, text_length_inputs: Sequence[str] = ()) -> None:
        names = list(inspect.signature(forward).parameters)
        unknown = set(text_length_inputs) - set(names)
        if unknown:
            raise ValueError(f"the blocks' forward takes no {sorted(unknown)}: it takes {names}")
        self.text_names = frozenset(text_length_inputs)
        self.text_positions = frozenset(names.index(name) for name in text_length_inputs)

    def __call__(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = tuple(_steady(value, i in self.text_positions) for i, value in enumerate(args))
        kwargs = {name: _steady(value, name in self.text_names) for name, value in kwargs.items()}
        return args, kwargs


def _steady(value: Any, text_length: bool) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    value = value.contiguous()
    # Any stride of a dimension of size 1 is contiguous, and dynamo's guards tell them apart (a
    # batch of one, flattened from channels-last, has another than the blocks' outputs): a view with
    # the row-major ones, no copy.
    row_major = _row_major_strides(value.shape)
    if value.stride() != row_major:
        value = value.as_strided(value.shape, row_major)
    if text_length:
        upstream.size_may_vary(value, 1)
    return value


def _row_major_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def keep_timesteps_on_host(pipe: Any, family: Family, device: torch.device) -> None:
    """Scheduler arithmetic on the host, the transformer's timestep on the GPU: no per-step sync.

    Only for families whose pipeline and scheduler were checked to work so (family.host_timesteps).
    """
    if device.type != "cuda" or not family.host_timesteps:
        return
    scheduler = pipe.scheduler
    set_timesteps = scheduler.set_timesteps

    def set_timesteps_on_host(num_inference_steps: int | None = None, device: Any = None, **kwargs: Any) -> Any:
        return set_timesteps(num_inference_steps, device="cpu", **kwargs)

    scheduler.set_timesteps = set_timesteps_on_host

    def timestep_to_device(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        timestep = kwargs.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.device != device:
            kwargs["timestep"] = timestep.to(device, non_blocking=True)
        return args, kwargs

    pipe.transformer.register_forward_pre_hook(timestep_to_device, with_kwargs=True)


def enable_cache(pipe: Any, denoisers: Sequence[str], config: SpeedConfig) -> None:
    """Opt-in step caching (changes outputs): reuse transformer work across similar steps."""
    if config.cache == "none":
        return
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    for name in denoisers:
        if config.cache == "first_block":
            cache = FirstBlockCacheConfig(threshold=config.cache_threshold)
        elif config.cache == "pyramid":
            cache = PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2,
                spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=lambda: pipe.current_timestep,
            )
        else:
            raise UserError(f"speed.cache={config.cache!r} must be none, first_block or pyramid.")
        getattr(pipe, name).enable_cache(cache)
    log.warning("speed.cache=%s approximates: videos differ from the uncached model's", config.cache)


@contextlib.contextmanager
def inference(config: SpeedConfig, device: torch.device) -> Iterator[None]:
    with torch.no_grad(), attention_context(config.attention, device):
        yield
