"""Cosmos-Predict2.5 as the runner asks a family: its options, build, call and memory terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from batch_runner.config import ModelConfig
from batch_runner.families.base import (
    DECODER,
    DENOISER,
    ENCODER,
    ActivationTerms,
    Family,
    Geometry,
    arch_json,
    imported,
    seeded,
    wan_vae_geometry,
)
from batch_runner.families.cosmos.guardrail import PassThroughGuardrail, nvidia_guardrail
from batch_runner.families.tokenizer import tiny_qwen25_vl
from batch_runner.upstream import DIFFUSERS_VERSIONS, Mirror

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer

    from batch_runner.families.cosmos.pipeline import CosmosImageToWorld

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


def tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer of Qwen2's class over single bytes (no merges), with a chat
    template as the pipeline uses it (a system and a user turn, each a list of text parts): offline.
    The system turn's text is one added token, so a short max_sequence_length keeps the prompt."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

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


class Cosmos(Family):
    name = "cosmos"
    Options = CosmosOptions
    pipeline_class = imported("batch_runner.families.cosmos.pipeline:CosmosImageToWorld")
    roles: ClassVar[dict[str, str]] = {"text_encoder": ENCODER, "transformer": DENOISER, "vae": DECODER}
    mirrors = (
        Mirror(
            "diffusers",
            "diffusers.models.transformers.transformer_cosmos:is_torchvision_available",
            DIFFUSERS_VERSIONS,
            "the module's `transforms` (torchvision, imported only where installed) stood in for",
        ),
        Mirror(
            "diffusers",
            "diffusers.models.transformers.transformer_cosmos:CosmosTransformer3DModel.forward",
            DIFFUSERS_VERSIONS,
            "frames.py restates it with the timestep embedding per frame",
        ),
        Mirror(
            "diffusers",
            "diffusers.models.transformers.transformer_cosmos:CosmosTransformerBlock.forward",
            DIFFUSERS_VERSIONS,
            "frames.py restates it over a per-frame view of the tokens",
        ),
    )
    # Measured on an H200 (docs/benchmarks.json, 2026-12-04): the 2B at its default (93 frames at
    # 1280x704, 24 x 44 x 80 tokens) under `none` with whole-frame decoding reserved 34.7 GiB over
    # 19.5 GiB of weights; under text_offload (24 GiB cap) allocated 15.0 over 4.1. The whole-frame
    # peak is charged to Wan 2.1's VAE at 1280x704, 18600 bytes per pixel, which is what Wan's VAE
    # is known to need at 720p. Denoising, with each block's modulation per frame (frames.py) and
    # the image's frame VAE-encoded alone (pipeline.py): text_offload with tiles allocated 7.34 GiB
    # over 4.08 of weights under 16 and 12 GiB caps (code 7efd1f5), at most 3.26 GiB of activations,
    # 20 bytes per token and width, charged 22; group_offload, before the frame was encoded alone,
    # 5.04 over 0.73 (12 GiB cap), 25. The 14B under group_offload (24 GiB cap, whole-frame decode,
    # H100, 2026-12-05, code 084d074) allocated at most 11.28 GiB over 0.44 of VAE and weights
    # outside the block lists and two 0.73 GiB blocks: at most 9.37 GiB of denoising activations,
    # 23.3 bytes per token and width, charged 24. (diffusers' own transformer, which copies the
    # modulation to every token, ran out of memory under text_offload at 12 GiB with at least 7.3
    # GiB of them, code fc8e5ce.) The 14B's resident term is the 2B's, not measured.
    activations = ActivationTerms(
        resident=22.0, streamed=24.0, decode_per_pixel=18600.0, tiled_pixels=256 * 256 * 2, guidance_batch=1
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
        from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, UniPCMultistepScheduler

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
        return self.pipeline_class(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            vae=vae,
            scheduler=UniPCMultistepScheduler.from_config(arch_json("cosmos-predict2.5-2b", "scheduler")),
        )

    def assemble(self, model: ModelConfig, modules: dict[str, Any], arch: str) -> CosmosImageToWorld:
        """The real architecture with random weights; the tokenizer is the tiny one (its ids stay far
        below the vocabulary)."""
        from diffusers import UniPCMultistepScheduler

        return self.pipeline_class(
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

    def streamline(self, transformer: torch.nn.Module, model: ModelConfig) -> None:
        """Each block's modulation once per latent frame instead of once per token (frames.py)."""
        from batch_runner.families.cosmos.frames import modulate_per_frame

        modulate_per_frame(transformer)

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
