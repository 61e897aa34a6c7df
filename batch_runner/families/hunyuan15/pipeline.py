"""HunyuanVideo-1.5's pipeline as the runner calls it: the guidance scale per call, a step callback."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Transformer3DModel,
)
from transformers import (
    ByT5Tokenizer,
    Qwen2_5_VLTextModel,
    Qwen2Tokenizer,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
)

from batch_runner.config import runs_guidance


class HunyuanImageToVideo(HunyuanVideo15ImageToVideoPipeline):
    """diffusers' pipeline, with the guidance scale as a call argument.

    The language model's text length follows its tokenizer where that is shorter than the pipeline's
    1000 tokens (the tiny model's 64), so every path (ours, the reference recipe) encodes alike.
    (speed.fuse_qkv leaves this transformer as it is: its attention modules are diffusers' older
    `Attention` class, which `fuse_qkv_projections` passes over.)
    """

    # diffusers reads a pipeline's components from its __init__ signature: it is spelt out.
    def __init__(
        self,
        text_encoder: Qwen2_5_VLTextModel,
        tokenizer: Qwen2Tokenizer,
        transformer: HunyuanVideo15Transformer3DModel,
        vae: AutoencoderKLHunyuanVideo15,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: ByT5Tokenizer,
        guider: ClassifierFreeGuidance,
        image_encoder: SiglipVisionModel,
        feature_extractor: SiglipImageProcessor,
    ) -> None:
        super().__init__(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            guider=guider,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        if tokenizer is not None:
            room = tokenizer.model_max_length - self.prompt_template_encode_start_idx
            self.tokenizer_max_length = min(self.tokenizer_max_length, room)

    def __call__(
        self,
        *args: Any,
        guidance_scale: float | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """diffusers' call, plus `guidance_scale` (a guider of that scale for this and later calls) and
        `callback_on_step_end` (called after each scheduler step, as other pipelines do; this one
        has no callback of its own, and the runner's progress and step timing need it)."""
        if guidance_scale is not None:
            guider = self.guider.new(guidance_scale=guidance_scale, enabled=runs_guidance(guidance_scale))
            self.register_modules(guider=guider)
        if callback_on_step_end is None:
            return super().__call__(*args, **kwargs)
        step, steps = self.scheduler.step, itertools.count()

        def step_then_call_back(model_output: Any, timestep: Any, *rest: Any, **options: Any) -> Any:
            out = step(model_output, timestep, *rest, **options)
            callback_on_step_end(self, next(steps), timestep, {})
            return out

        self.scheduler.step = step_then_call_back  # an instance attribute, removed below
        try:
            return super().__call__(*args, **kwargs)
        finally:
            del self.scheduler.step
