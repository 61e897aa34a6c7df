"""LTX-2's guidance passes of a step in one forward: the runner's change to diffusers'
`LTX2VideoTransformer3DModel` (`Family.streamline`). Mirrors diffusers 0.42.1.

Why. diffusers' LTX-2 pipeline calls the transformer up to three times a step, on the same latents:
the classifier-free guidance pair (unconditional, conditional) as a batch of 2, then a
spatio-temporal guidance (STG) pass and a modality-isolation pass, each a batch of 1. Under a
memory budget that streams the weights (35 GiB in bf16), each call streams all of them again: at
24 GiB a step spent about 2 s on the copies against 1.35 s of compute (docs/benchmarks.json).

What changes, and why the output does not:
- STG on LTX-2.0. diffusers skips a block's self-attention for the STG pass only in blocks built
  with `perturbed_attn` (LTX-2.3's); LTX-2.0's config has none, so diffusers' STG pass computes the
  conditional prediction a second time, and its guidance term is `stg_scale` x (that prediction
  minus itself). Here the pass is handed the conditional prediction of the step's first forward:
  the term is exactly 0 (diffusers': 0 up to the kernels' rounding between batch sizes). A model
  whose blocks do perturb runs its STG pass as diffusers does.
- Modality isolation. The step's first forward takes one more sample, a copy of the conditional
  one, whose audio-to-video and video-to-audio attention outputs are multiplied by 0 in every block
  (`Isolating`): the block adds gate x 0 to the hidden states, which leaves them as the
  isolated pass, which skips those attentions, leaves them. The isolation call gets that sample's
  rows.
So a step is one forward of 3 samples instead of three forwards of 4 (2 + 1 + 1): the weights
stream once, and a quarter of the compute goes.

Each served call first checks that its inputs are the ones the first forward took for that sample
(latents, texts, timesteps and positions, compared on the GPU); a call that does not match runs its
own forward, as stock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import LTX2VideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx2 import (
    AudioVisualModelOutput,
    LTX2AudioVideoAttnProcessor,
    LTX2PerturbedAttnProcessor,
    LTX2VideoTransformerBlock,
)

log = logging.getLogger(__name__)

# The forward's arguments that hold one entry per sample (the batch is their first dimension).
PER_SAMPLE = (
    "hidden_states",
    "audio_hidden_states",
    "encoder_hidden_states",
    "audio_encoder_hidden_states",
    "timestep",
    "audio_timestep",
    "sigma",
    "audio_sigma",
    "encoder_attention_mask",
    "audio_encoder_attention_mask",
    "video_coords",
    "audio_coords",
    "video_self_attention_mask",
    "video_keyframes_mask",
)


@dataclass
class Switch:
    """Per-sample factors for the cross-modal attention outputs of the forward running now: 1 keeps a
    sample's, 0 isolates it; None (between forwards) keeps every sample's."""

    keep: torch.Tensor | None = None


class Isolating:
    """Mixed into diffusers' processor of an audio-to-video or video-to-audio attention: its output
    (one row per sample, after the output projection) scaled per sample by the shared `Switch`."""

    switch: Switch

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        output = super().__call__(attn, hidden_states, *args, **kwargs)  # type: ignore[misc]
        keep = self.switch.keep
        return output if keep is None else output * keep.to(output.dtype)


# diffusers' processors of those attentions: LTX-2.0's, and LTX-2.3's (blocks with `perturbed_attn`).
CROSS_MODAL_PROCESSORS = (LTX2AudioVideoAttnProcessor, LTX2PerturbedAttnProcessor)
ISOLATING = {cls: type(f"Isolating{cls.__name__}", (Isolating, cls), {}) for cls in CROSS_MODAL_PROCESSORS}


def isolating(processor: Any, switch: Switch) -> Any:
    """A processor of `processor`'s class that also reads `switch` (its attention backend set later)."""
    made = ISOLATING[type(processor)]()
    made.switch = switch
    return made


@dataclass
class Served:
    """One pass's outputs from the step's first forward, and the inputs they were made from."""

    inputs: dict[str, torch.Tensor]
    outputs: tuple[torch.Tensor, torch.Tensor]

    def matches(self, kwargs: dict[str, Any]) -> bool:
        """Whether the call's per-sample inputs are the ones the outputs were made from: compared on
        their device and read back once (a `torch.equal` each would wait for the GPU a dozen times)."""
        given = {k: v for k, v in kwargs.items() if k in PER_SAMPLE and isinstance(v, torch.Tensor)}
        if given.keys() != self.inputs.keys():
            return False
        made = self.inputs
        if any(v.shape != made[k].shape or v.dtype != made[k].dtype for k, v in given.items()):
            return False
        return bool(torch.stack([torch.eq(v, made[k]).all() for k, v in given.items()]).all())


@dataclass
class Passes:
    """What the first forward of a step makes for the calls after it (set by `batch_guidance`)."""

    isolate: bool  # add the modality-isolated sample
    stg_repeats: bool  # the STG pass computes the conditional prediction again (no block perturbs)
    switch: Switch = field(default_factory=Switch)
    served: dict[str, Served] = field(default_factory=dict)  # "isolated", "conditional"
    warned: bool = False


class GuidanceBatchedLTX2(LTX2VideoTransformer3DModel):
    """diffusers' model; a step's guidance passes in its first forward (see the module's docstring)."""

    _passes: Passes

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        passes = self._passes
        if args:  # not the pipeline's call, which names every argument
            return super().forward(*args, **kwargs)
        if kwargs.get("isolate_modalities"):
            return self._serve("isolated", kwargs)
        if kwargs.get("spatio_temporal_guidance_blocks"):
            return self._serve("conditional", kwargs) if passes.stg_repeats else super().forward(**kwargs)
        if kwargs.get("perturbation_mask") is not None or not (passes.isolate or passes.stg_repeats):
            return super().forward(**kwargs)
        return self._first(kwargs)

    def _first(self, kwargs: dict[str, Any]) -> Any:
        """The step's first forward, with the isolated sample appended where isolation follows."""
        passes = self._passes
        passes.served.clear()
        batch = kwargs["hidden_states"].shape[0]
        last = {
            k: v[batch - 1 : batch]
            for k, v in kwargs.items()
            if k in PER_SAMPLE and isinstance(v, torch.Tensor) and v.shape[0] == batch
        }
        wanted_dict = kwargs.get("return_dict", True)
        call = kwargs | {"return_dict": False}
        if passes.isolate:
            call |= {k: torch.cat([kwargs[k], v]) for k, v in last.items()}
            keep = torch.ones(batch + 1, 1, 1, device=kwargs["hidden_states"].device)
            keep[batch] = 0
            passes.switch.keep = keep
        try:
            video, audio = super().forward(**call)
        finally:
            passes.switch.keep = None
        if passes.isolate:
            passes.served["isolated"] = Served(last, (video[batch:], audio[batch:]))
            video, audio = video[:batch], audio[:batch]
        if passes.stg_repeats:
            passes.served["conditional"] = Served(last, (video[batch - 1 :], audio[batch - 1 :]))
        return _returned((video, audio), wanted_dict)

    def _serve(self, name: str, kwargs: dict[str, Any]) -> Any:
        """The pass `name`'s outputs from the step's first forward, or its own forward where its inputs differ."""
        passes = self._passes
        served = passes.served.pop(name, None)
        if served is not None and served.matches(kwargs):
            return _returned(served.outputs, kwargs.get("return_dict", True))
        if not passes.warned:
            passes.warned = True
            log.warning("LTX-2: the %s guidance pass did not match the step's first forward; it runs on its own", name)
        return super().forward(**kwargs)


def _returned(outputs: tuple[torch.Tensor, torch.Tensor], as_dict: bool) -> Any:
    return AudioVisualModelOutput(sample=outputs[0], audio_sample=outputs[1]) if as_dict else outputs


def batch_guidance(transformer: torch.nn.Module, *, stg: bool, isolation: bool) -> None:
    """Make diffusers' LTX-2 transformer (exactly that class) serve a step's STG pass (`stg`: its scale
    is above 0) and modality-isolation pass (`isolation`: its scale is above 1) from the step's first
    forward; anything else, or a model where neither applies, is left as it is."""
    if type(transformer) is not LTX2VideoTransformer3DModel:
        return
    blocks = transformer.transformer_blocks
    if any(type(b) is not LTX2VideoTransformerBlock for b in blocks):
        return
    stg_repeats = stg and not any(b.perturbed_attn for b in blocks)
    cross_modal = [attention for b in blocks for attention in (b.audio_to_video_attn, b.video_to_audio_attn)]
    isolate = isolation and all(type(a.processor) in ISOLATING for a in cross_modal)
    if not (stg_repeats or isolate):
        return
    passes = Passes(isolate=isolate, stg_repeats=stg_repeats)
    if isolate:
        for attention in cross_modal:
            attention.set_processor(isolating(attention.processor, passes.switch))
    transformer._passes = passes
    transformer.__class__ = GuidanceBatchedLTX2
