"""Cosmos-Predict2.5 image to world (NVIDIA), as diffusers ships it in `Cosmos2_5_PredictBasePipeline`.

One pipeline class, two checkpoints of the same shape: 2B (28 blocks of width 2048) and 14B (36 of
width 5120). The text encoder is Cosmos-Reason1-7B (a Qwen2.5-VL 7B): the prompt, in a chat
template padded to 512 tokens, goes through it and every layer's hidden states, normalised and
concatenated (28 x 3584 values a token), are projected by the transformer to its text width and
cross-attended by every block; text stays out of the self-attention sequence. The VAE is Wan 2.1's
(8x8 pixels and 4 frames a latent: frames 4N+1), the transformer takes 1x2x2 latents a token. The
row's image is the first latent frame, held at a near-zero noise level; there is no last frame.
Its attention goes through diffusers' attention dispatcher, at the process-wide backend: the kernel
is chosen with `sdpa_kernel` inside each processor call, as for CogVideoX. `transformer_blocks` repeat.

The guardrail. NVIDIA's model comes with a safety checker (`cosmos_guardrail`, a separate pip
package that downloads its own models: a blocklist and Qwen3Guard for the prompt, RetinaFace to blur
faces in the video). The pipeline refuses to run without one. `model.options.guardrail=true` (the
full-size configs' default) builds it: each prompt is checked before its video is made (a row whose
prompt it flags fails with its message) and faces in every video are blurred. `false` puts a
pass-through in its place, for runs without that package or its downloads: prompts are not checked
and videos are kept as generated (the README says what that means under NVIDIA's licence).

NVIDIA's own scripts can also rewrite prompts with a prompt upsampler (Cosmos-Reason1); diffusers'
pipeline has none, so prompts are used as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    Cosmos2_5_PredictBasePipeline,
    CosmosTransformer3DModel,
    UniPCMultistepScheduler,
)
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from batch_runner.config import ModelConfig
from batch_runner.errors import UserError
from batch_runner.families.base import (
    DECODER,
    DENOISER,
    ENCODER,
    ActivationTerms,
    Family,
    Geometry,
    arch_json,
    seeded,
    wan_vae_geometry,
)
from batch_runner.families.tokenizer import tiny_qwen25_vl

# The system turn of the pipeline's chat template (an added token of the tiny tokenizer).
SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."
TINY_TEXT, TINY_LAYERS = 16, 2


@dataclass(frozen=True)
class CosmosOptions:
    """model.options of Cosmos-Predict2.5.

    `guardrail`: NVIDIA's safety checker (the `cosmos_guardrail` package and its downloads) checks
    each prompt and blurs faces in each video; false runs without it (see the README first).
    """

    guardrail: bool = True


class PassThroughGuardrail:
    """Stands where the pipeline wants its safety checker when the guardrail is off: every prompt
    passes and every video is kept as generated. Holds no weights; not saved with the pipeline."""

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
        return frames

    def to(self, *args: Any, **kwargs: Any) -> PassThroughGuardrail:
        return self


def nvidia_guardrail() -> Any:
    """NVIDIA's safety checker; a UserError saying how to get it, or turn it off, where it is missing."""
    try:
        from cosmos_guardrail import CosmosSafetyChecker
    except ImportError as e:
        raise UserError(
            "model.options.guardrail=true needs NVIDIA's Cosmos guardrail: `pip install cosmos_guardrail` (it "
            "downloads nvidia/Cosmos-1.0-Guardrail and Qwen/Qwen3Guard-Gen-0.6B on first use); or set "
            "model.options.guardrail=false to run without it (README, Cosmos-Predict2.5)."
        ) from e
    return CosmosSafetyChecker()


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


def tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer of Qwen2's class over single bytes (no merges), with a chat
    template as the pipeline uses it (a system and a user turn, each a list of text parts): offline.
    The system turn's text is one added token, so a short max_sequence_length keeps the prompt."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(SYSTEM_PROMPT, normalized=False)]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% for part in m['content'] %}{{ part['text'] }}{% endfor %}<|im_end|>\n{% endfor %}"
    )
    return tokenizer


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


class Cosmos(Family):
    name = "cosmos"
    Options = CosmosOptions
    pipeline_class = CosmosImageToWorld
    roles: ClassVar[dict[str, str]] = {"text_encoder": ENCODER, "transformer": DENOISER, "vae": DECODER}
    # Denoising: Wan's 16 bytes per token and width (an estimate: a DiT of the same kind). Measured:
    # the 2B at its default (93 frames at 1280x704, 24 x 44 x 80 tokens) under `none` with whole-frame
    # decoding allocated 30.5 GiB and reserved 35.2 on an H200 (docs/benchmarks.json, 2026-12-04)
    # over 19.5 GiB of weights. That one record does not say which phase peaked; it is charged to
    # Wan 2.1's VAE at 1280x704 (the encode of the conditioning frames or the decode), 18600 bytes
    # per pixel, which is what Wan's VAE is known to need at 720p. Other budgets are not measured yet.
    activations = ActivationTerms(
        resident=16.0, streamed=16.0, decode_per_pixel=18600.0, tiled_pixels=256 * 256 * 2, guidance_batch=1
    )
    schedulers: ClassVar[dict[str, str]] = {"unipc": "UniPCMultistepScheduler"}

    def output_options(self, model: ModelConfig) -> dict[str, Any]:
        """The guardrail blurs faces: a video made with it is not the one made without."""
        return {"guardrail": self.options(model).guardrail}

    # --- building ---

    def tiny(self, model: ModelConfig) -> CosmosImageToWorld:
        """Cosmos-Predict2.5 at toy scale: every component of the real one (Qwen2.5-VL with its vision
        tower, Wan VAE, the transformer with its text projection over every layer), random weights,
        tokenizer built in code."""
        tokenizer = tiny_qwen_tokenizer()
        with seeded(0):
            text_encoder = tiny_qwen25_vl(len(tokenizer), TINY_TEXT, TINY_LAYERS)
            transformer = CosmosTransformer3DModel(
                in_channels=16 + 1,
                out_channels=16,
                num_attention_heads=2,
                attention_head_dim=16,
                num_layers=2,
                mlp_ratio=2.0,
                text_embed_dim=16,
                adaln_lora_dim=4,
                max_size=(16, 32, 32),
                patch_size=(1, 2, 2),
                rope_scale=(1.0, 3.0, 3.0),
                concat_padding_mask=True,
                extra_pos_embed_type=None,
                use_crossattn_projection=True,
                crossattn_proj_in_channels=TINY_LAYERS * TINY_TEXT,
                encoder_hidden_states_channels=16,
            )
            vae = AutoencoderKLWan(
                base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
            )
        return CosmosImageToWorld(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            vae=vae,
            scheduler=UniPCMultistepScheduler.from_config(arch_json("cosmos-predict2.5-2b", "scheduler")),
        )

    def assemble(self, model: ModelConfig, modules: dict[str, Any], arch: str) -> CosmosImageToWorld:
        """The real architecture with random weights; the tokenizer is the tiny one (its ids stay far
        below the vocabulary)."""
        return CosmosImageToWorld(
            tokenizer=tiny_qwen_tokenizer(),
            scheduler=UniPCMultistepScheduler.from_config(arch_json(arch, "scheduler")),
            **modules,
        )

    def finish(self, model: ModelConfig, pipe: Any) -> Any:
        """The guardrail the config asks for: NVIDIA's, or the pass-through."""
        pipe.safety_checker = nvidia_guardrail() if self.options(model).guardrail else PassThroughGuardrail()
        return pipe

    # --- rows ---

    def encode_prompts(self, pipe: Any, texts: list[str], model: ModelConfig, dtype: torch.dtype) -> list[torch.Tensor]:
        """As every family's, but kept in host memory: a text here is every layer of the 7B encoder,
        512 x 100352 values (98 MiB in bf16), and the replica caches 64 texts, which would take GPU
        memory no plan counts. The pipeline call moves the row's two onto the GPU."""
        return [e.to("cpu") for e in super().encode_prompts(pipe, texts, model, dtype)]

    def call_arguments(self, model: ModelConfig, job: Any, images: dict[str, Any], embeds: Any) -> dict[str, Any]:
        arguments = super().call_arguments(model, job, images, embeds)
        return arguments | {"guarded_prompt": job.prompt}

    # --- structure ---

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return transformer.transformer_blocks

    def prefer_attention(self, transformer: torch.nn.Module, order: list, backend: str) -> None:
        """Its processors call diffusers' dispatcher without a backend of their own (so the
        process-wide one), which `set_attention_backend` does not change: as CogVideoX's, each runs
        inside `sdpa_kernel` with the SDPA backend order, which the compiled blocks trace."""
        from batch_runner.families.cogvideox import PreferredAttention

        for module in transformer.modules():  # it has no AttentionMixin: each attention module in turn
            if hasattr(module, "set_processor") and getattr(module, "processor", None) is not None:
                module.set_processor(PreferredAttention(module.processor, order))

    def geometry(self, configs: dict[str, dict]) -> Geometry:
        return wan_vae_geometry(configs)


FAMILY = Cosmos()
