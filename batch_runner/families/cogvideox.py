"""CogVideoX 1.0 and 1.5 image-to-video (THUDM), as diffusers ships them.

Its attention processor calls PyTorch's SDPA directly, so diffusers' attention dispatcher does not
reach it: the kernel is chosen with `sdpa_kernel` inside each processor call. Text tokens join the
video tokens in self-attention, so they count towards the activation memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

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
)
from batch_runner.families.tokenizer import TINY_TEXT_DIM, tiny_text_encoder, tiny_tokenizer

if TYPE_CHECKING:
    from diffusers import CogVideoXImageToVideoPipeline


@dataclass(frozen=True)
class CogVideoXOptions:
    """model.options of CogVideoX, defaults as CogVideo's own demo.

    `timestep_spacing`: how the scheduler spaces its steps over the training timesteps;
    `use_dynamic_cfg`: the pipeline's cosine-ramped guidance scale over the steps.
    """

    timestep_spacing: Literal["trailing", "leading", "linspace"] = "trailing"
    use_dynamic_cfg: bool = True


class CogVideoX(Family):
    name = "cogvideox"
    Options = CogVideoXOptions
    pipeline_class = imported("diffusers:CogVideoXImageToVideoPipeline")
    roles: ClassVar[dict[str, str]] = {"text_encoder": ENCODER, "transformer": DENOISER, "vae": DECODER}
    # Fitted to CogVideoX-5B-I2V at 49x480x720 with guidance, compiled blocks, on an H100
    # (docs/benchmarks.json): 3.9 GiB of activations above the weights for the resident plans
    # (none 23.64 GiB peak, text_offload 14.76; 42 here, so that the estimate also covers what the
    # allocator reserved), 3.2 GiB for the streamed transformer (group_offload 4.4 GiB in all).
    activations = ActivationTerms(resident=42.0, streamed=31.5, decode_per_pixel=2900.0, tiled_pixels=240 * 360 * 2)
    schedulers: ClassVar[dict[str, str]] = {"dpm": "CogVideoXDPMScheduler", "ddim": "CogVideoXDDIMScheduler"}
    host_timesteps = True

    def scheduler_overrides(self, model: ModelConfig) -> dict[str, Any]:
        return {"timestep_spacing": self.options(model).timestep_spacing}

    def output_options(self, model: ModelConfig) -> dict[str, Any]:
        """Both options change the video."""
        return asdict(self.options(model))

    def tiny(self, model: ModelConfig) -> CogVideoXImageToVideoPipeline:
        """CogVideoX image-to-video at toy scale: same classes and code paths, random weights.

        Rotary positions only (no learned positional embedding, which would fix the size to one):
        the tiny model makes every size its config's rules allow.
        """
        from diffusers import (
            AutoencoderKLCogVideoX,
            CogVideoXDDIMScheduler,
            CogVideoXTransformer3DModel,
        )
        from transformers import T5Config, T5EncoderModel

        tokenizer = tiny_tokenizer()
        with seeded(0):
            text_encoder = tiny_text_encoder(T5EncoderModel, T5Config, tokenizer.vocab_size)
            transformer = CogVideoXTransformer3DModel(
                num_attention_heads=2,
                attention_head_dim=16,
                in_channels=8,
                out_channels=4,
                time_embed_dim=16,
                text_embed_dim=TINY_TEXT_DIM,
                num_layers=2,
                sample_width=12,
                sample_height=8,
                sample_frames=9,
                patch_size=2,
                temporal_compression_ratio=4,
                max_text_seq_length=64,
                use_rotary_positional_embeddings=True,
                use_learned_positional_embeddings=False,
            )
            vae = AutoencoderKLCogVideoX(
                in_channels=3,
                out_channels=3,
                down_block_types=("CogVideoXDownBlock3D",) * 4,
                up_block_types=("CogVideoXUpBlock3D",) * 4,
                block_out_channels=(8, 8, 8, 8),
                latent_channels=4,
                layers_per_block=1,
                norm_num_groups=2,
                temporal_compression_ratio=4,
                # Tiles are half the sample size: at this size the tiny model's videos are never tiled
                # (diffusers' tiled encode mis-sizes latents of images smaller than a few tiles).
                sample_height=256,
                sample_width=384,
            )
        scheduler = CogVideoXDDIMScheduler.from_config(arch_json("cogvideox-5b-i2v", "scheduler"))
        return self.pipeline_class(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )

    def assemble(self, model: ModelConfig, modules: dict[str, Any], arch: str) -> CogVideoXImageToVideoPipeline:
        from diffusers import CogVideoXDDIMScheduler

        return self.pipeline_class(
            tokenizer=tiny_tokenizer(model.max_sequence_length),
            scheduler=CogVideoXDDIMScheduler.from_config(arch_json(arch, "scheduler")),
            **modules,
        )

    def call_arguments(self, model: ModelConfig, job: Any, images: dict[str, Any], embeds: Any) -> dict[str, Any]:
        arguments = super().call_arguments(model, job, images, embeds)
        return arguments | {"use_dynamic_cfg": self.options(model).use_dynamic_cfg}

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return transformer.transformer_blocks

    def geometry(self, configs: dict[str, dict]) -> Geometry:
        t, vae = configs["transformer"], configs["vae"]
        return Geometry(
            spatial=2 ** (len(vae["block_out_channels"]) - 1),
            temporal=vae["temporal_compression_ratio"],
            patch=t["patch_size"],
            patch_t=t.get("patch_size_t") or 1,
            hidden=t["num_attention_heads"] * t["attention_head_dim"],
            text_in_sequence=True,
            vae_channels=max(vae["block_out_channels"]),
        )

    def prefer_attention(self, transformer: torch.nn.Module, order: list, backend: str) -> None:
        processors = {
            key: PreferredAttention(getattr(p, "processor", p), order) for key, p in transformer.attn_processors.items()
        }
        transformer.set_attn_processor(processors)


class PreferredAttention:
    """Runs CogVideoX's attention processor with the SDPA backend order set inside the call.

    torch.compile chooses the SDPA kernel while tracing and does not see a backend context set
    around the compiled block, so the preference has to live inside the traced region.
    """

    def __init__(self, processor: Any, order: list[SDPBackend]) -> None:
        self.processor = processor
        self.order = order

    # The explicit signature matters: diffusers drops keyword arguments a processor does not name.
    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> Any:
        with sdpa_kernel(self.order, set_priority=True):
            return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


FAMILY = CogVideoX()
