"""SkyReels-V2 image-to-video (Skywork), as diffusers ships it in `SkyReelsV2ImageToVideoPipeline`.

The 14B I2V checkpoints (540P, 720P) are Wan 2.1 I2V 14B's architecture, fine-tuned: the same UMT5
text encoder, CLIP ViT-H image encoder conditioning every block through added key/value projections,
the Wan VAE (8x8 pixels and 4 frames a latent: frames 4N+1) and 40 blocks of width 5120 taking 1x2x2
latents a token. Text reaches the video by cross-attention only, so it does not lengthen the
self-attention sequence. Its attention goes through diffusers' attention dispatcher
(`set_attention_backend`); its `_repeated_blocks` are `transformer.blocks`, compiled one by one.

The conditional and unconditional passes are separate forwards of batch 1, as in Wan. Only the first
frame conditions: the pipeline accepts a `last_image`, but the I2V checkpoints have no position
embedding for a second image (that is the separate FLF2V model), so a last frame is refused by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from batch_runner.config import ModelConfig
from batch_runner.families.base import (
    DECODER,
    DENOISER,
    ENCODER,
    WAN_VAE_DECODE,
    ActivationTerms,
    Family,
    Geometry,
    arch_json,
    imported,
    seeded,
    wan_vae_geometry,
)
from batch_runner.families.tokenizer import TINY_TEXT_DIM, tiny_text_encoder, tiny_tokenizer
from batch_runner.upstream import DIFFUSERS_VERSIONS, Mirror

if TYPE_CHECKING:
    from diffusers import SkyReelsV2ImageToVideoPipeline

TINY_HEADS, TINY_HEAD_DIM = 2, 12


class SkyReelsV2(Family):
    name = "skyreels"
    pipeline_class = imported("diffusers:SkyReelsV2ImageToVideoPipeline")
    roles: ClassVar[dict[str, str]] = {
        "text_encoder": ENCODER,
        "image_encoder": ENCODER,
        "transformer": DENOISER,
        "vae": DECODER,
    }
    # The architecture is Wan 2.1 I2V 14B's, and its VAE Wan's (base.WAN_VAE_DECODE). The
    # 540P default (97 frames at 960x544, 25 x 34 x 60 tokens) under `none`, whole-frame decoding,
    # allocated 48.6 GiB on an H200 (docs/benchmarks.json, 2026-12-04) over 42.5 GiB of weights and
    # reserved 54.0 on cuDNN, 54.8 on FlashAttention-4: more than Wan's 16 bytes per token and width
    # give; 27 covers both. Streamed, measured on the same card (code fc8e5ce): text_offload under a
    # 48 GiB cap allocated 36.9 GiB, group_offload under 24 allocated 6.7, which Wan's 16 covers.
    # The 720P one (121 frames at 1280x720, 31 x 45 x 80) is not measured yet.
    mirrors = (
        Mirror(
            "diffusers",
            "diffusers.models.transformers.transformer_skyreels_v2:SkyReelsV2AttnProcessor.__call__",
            DIFFUSERS_VERSIONS,
            "wan_attention.PairedRotaryAttention takes its place, its steps but the rotary's",
        ),
    )
    activations = ActivationTerms(resident=27.0, streamed=16.0, guidance_batch=1, **WAN_VAE_DECODE)
    schedulers: ClassVar[dict[str, str]] = {
        "unipc": "UniPCMultistepScheduler",
        "euler": "FlowMatchEulerDiscreteScheduler",
    }

    # --- building ---

    def tiny(self, model: ModelConfig) -> SkyReelsV2ImageToVideoPipeline:
        """SkyReels-V2 I2V at toy scale: every component of the 14B (UMT5, CLIP, Wan VAE, the SkyReels
        transformer with image cross-attention), random weights, tokenizer built in code."""
        from diffusers import (
            AutoencoderKLWan,
            SkyReelsV2Transformer3DModel,
            UniPCMultistepScheduler,
        )
        from transformers import (
            CLIPImageProcessor,
            CLIPVisionConfig,
            CLIPVisionModelWithProjection,
            UMT5Config,
            UMT5EncoderModel,
        )

        tokenizer = tiny_tokenizer()
        with seeded(0):
            text_encoder = tiny_text_encoder(UMT5EncoderModel, UMT5Config, tokenizer.vocab_size)
            vae = AutoencoderKLWan(
                base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
            )
            transformer = SkyReelsV2Transformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=TINY_HEADS,
                attention_head_dim=TINY_HEAD_DIM,
                in_channels=36,
                out_channels=16,
                text_dim=TINY_TEXT_DIM,
                freq_dim=256,
                ffn_dim=32,
                num_layers=2,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
                rope_max_seq_len=32,
                image_dim=4,
                added_kv_proj_dim=TINY_HEADS * TINY_HEAD_DIM,
            )
            image_encoder = CLIPVisionModelWithProjection(
                CLIPVisionConfig(
                    hidden_size=4,
                    projection_dim=4,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    image_size=32,
                    intermediate_size=16,
                    patch_size=1,
                )
            ).eval()
        return self.pipeline_class(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
            image_processor=CLIPImageProcessor(crop_size=32, size=32),
            transformer=transformer,
            vae=vae,
            scheduler=UniPCMultistepScheduler(
                prediction_type="flow_prediction",
                use_flow_sigmas=True,
                num_train_timesteps=1000,
                flow_shift=model.flow_shift or 5.0,
            ),
        )

    def assemble(self, model: ModelConfig, modules: dict[str, Any], arch: str) -> SkyReelsV2ImageToVideoPipeline:
        from diffusers import UniPCMultistepScheduler
        from transformers import CLIPImageProcessor

        return self.pipeline_class(
            tokenizer=tiny_tokenizer(model.max_sequence_length),
            scheduler=UniPCMultistepScheduler.from_config(arch_json(arch, "scheduler")),
            image_processor=CLIPImageProcessor(crop_size=224, size=224),
            **modules,
        )

    # --- structure ---

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return transformer.blocks

    def streamline(self, transformer: torch.nn.Module, model: ModelConfig) -> None:
        """The patch embedding's output in channels-last order, so that the transformer's
        `flatten(2).transpose(1, 2)` hands the blocks a row-major token sequence: stock, the blocks
        get it transposed and keep it so (a block's outputs take its inputs' layout), and every
        block's elementwise work goes column-wise through it. diffusers 0.42 makes Wan's (the same
        architecture) contiguous for that reason (huggingface/diffusers#14236), not this copy of it.
        Done here rather than at the first block (speed.SteadyInputs): the transposed original is
        freed at once instead of living through the first block beside its copy. And Wan's attention
        with its rotary embedding written for one fused pass (wan_attention)."""
        transformer.patch_embedding.register_forward_hook(_channels_last)
        from batch_runner.families.wan_attention import pair_rotary  # imports diffusers

        pair_rotary(transformer)

    def geometry(self, configs: dict[str, dict]) -> Geometry:
        return wan_vae_geometry(configs)


def _channels_last(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous(memory_format=torch.channels_last_3d)


FAMILY = SkyReelsV2()
