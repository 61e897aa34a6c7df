"""Cosmos-Predict2.5's pipeline as the runner builds it: diffusers' `Cosmos2_5_PredictBasePipeline`, the
guardrail a setting, the image a one-frame clip; and the stand-in for torchvision its transformer calls."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLWan,
    Cosmos2_5_PredictBasePipeline,
    CosmosTransformer3DModel,
    UniPCMultistepScheduler,
)
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from batch_runner.families.cosmos.guardrail import PassThroughGuardrail


class CosmosImageToWorld(Cosmos2_5_PredictBasePipeline):
    """diffusers' pipeline, with the guardrail a setting rather than a constructor default.

    diffusers builds NVIDIA's checker whenever none is given (an ImportError without the package)
    and saves none. Here a pass-through stands in until the family installs the one the config asks
    for (`Cosmos.finish`). Its prompt check runs only on prompt strings, and the runner passes
    embeddings: `guarded_prompt` gives it the row's prompt to check.
    """

    # diffusers reads a pipeline's components from its __init__ signature: it is spelt out.
    def __init__(
        self,
        text_encoder: Qwen2_5_VLForConditionalGeneration,
        tokenizer: AutoTokenizer,
        transformer: CosmosTransformer3DModel,
        vae: AutoencoderKLWan,
        scheduler: UniPCMultistepScheduler,
        safety_checker: Any = None,
    ) -> None:
        super().__init__(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            safety_checker=safety_checker or PassThroughGuardrail(),
        )
        self.register_to_config(safety_checker=(None, None))  # never saved, never loaded

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> CosmosImageToWorld:
        kwargs.setdefault("safety_checker", PassThroughGuardrail())
        return super().from_pretrained(*args, **kwargs)

    def __call__(
        self,
        image: Any = None,
        *,
        guarded_prompt: str | None = None,
        height: int = 704,
        width: int = 1280,
        **kwargs: Any,
    ) -> Any:
        """diffusers' call, plus `guarded_prompt`; the image goes in as a one-frame clip.

        diffusers' image path converts the image with torchvision, which this project does not
        install. Its video path takes a clip already preprocessed and conditions on its last latent
        frame: the image alone, preprocessed as the image path does it, is that latent frame (the Wan
        VAE encodes a clip's first frame on its own, and every latent frame after it is masked out
        of the conditioning), so the video is the one the image path makes.
        """
        if guarded_prompt is not None and not self.safety_checker.check_text_safety(guarded_prompt):
            raise ValueError(f"Cosmos Guardrail flagged the prompt as unsafe: {guarded_prompt!r}.")
        for key in ("prompt_embeds", "negative_prompt_embeds"):  # kept on the host (Cosmos.encode_prompts)
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key].to(self._execution_device)
        if image is not None:
            kwargs["video"] = self.video_processor.preprocess_video([image], height, width)
            kwargs["num_latent_conditional_frames"] = 1
        return super().__call__(height=height, width=width, **kwargs)

    def prepare_latents(self, video: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """diffusers' latents, the image's frame VAE-encoded alone.

        diffusers repeats a one-frame clip to the video's length (93 frames) and encodes all of it,
        though only the first latent frame is kept (every other one is masked out wherever the
        conditioning latents are read). The Wan VAE encodes a clip's first frame on its own, so its
        latent is the one the whole clip gives; the masked frames are zeros (3 s a video at 720p).
        """
        if video is None or kwargs.get("num_frames_in") != 1:
            return super().prepare_latents(video, *args, **kwargs)
        latents, cond_latents, cond_mask, cond_indicator = super().prepare_latents(video[:, :, :1], *args, **kwargs)
        masked = cond_latents.new_zeros(*cond_latents.shape[:2], latents.shape[2] - 1, *cond_latents.shape[3:])
        return latents, torch.cat([cond_latents, masked], dim=2), cond_mask, cond_indicator


class _TorchvisionResize:
    """torchvision's `transforms`, as far as diffusers' Cosmos transformer uses it: a nearest resize
    of its padding mask. torchvision resizes a tensor with torch's own nearest interpolation, so
    this is the same arithmetic; it stands in only where torchvision is not installed."""

    class InterpolationMode:
        NEAREST = "nearest"

    class functional:  # torchvision's name
        @staticmethod
        def resize(tensor: torch.Tensor, size: list[int], interpolation: str = "nearest") -> torch.Tensor:
            return torch.nn.functional.interpolate(tensor, size=list(size), mode="nearest")


def _stand_in_for_torchvision() -> None:
    """diffusers' Cosmos transformer imports torchvision's `transforms` when it is installed and calls
    it on every forward; this project does not install torchvision."""
    from diffusers.models.transformers import transformer_cosmos

    if not hasattr(transformer_cosmos, "transforms"):
        transformer_cosmos.transforms = _TorchvisionResize


_stand_in_for_torchvision()
