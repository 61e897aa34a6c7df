"""HunyuanVideo-1.5 as the runner asks a family: its rows (buckets), its call, its memory terms."""

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
)
from batch_runner.families.hunyuan15.buckets import buckets, nearest_bucket, target_size_of

if TYPE_CHECKING:
    from batch_runner.families.hunyuan15.pipeline import HunyuanImageToVideo

# The pipeline's fixed text lengths: ByT5 glyph tokens and SigLIP image tokens (27x27 patches of a
# 384-pixel image) join the language model's tokens in the sequence.
GLYPH_TOKENS = 256
IMAGE_TOKENS = 729


class HunyuanVideo15(Family):
    name = "hunyuan15"
    pipeline_class = imported("batch_runner.families.hunyuan15.pipeline:HunyuanImageToVideo")
    roles: ClassVar[dict[str, str]] = {
        "text_encoder": ENCODER,
        "text_encoder_2": ENCODER,
        "image_encoder": ENCODER,
        "transformer": DENOISER,
        "vae": DECODER,
    }
    # Measured without the text mask (docs/benchmarks.json): with everything resident, 46.2 GiB
    # allocated at 480p (H100) and 46.6 at 720p (H200), 62.9 and 63.0 reserved: the peak does not
    # grow with the video, so it is the tiled VAE decode (~14 GiB allocated above the 32.2 GiB of
    # weights), and the uncapped allocator holds ~17 GiB more. This VAE decodes all 121 frames of a
    # 256-pixel tile at once. The decode term covers that reserve (24.6 GiB: the planner must not
    # promise less than a card needed), which also refuses what failed: text_offload under a 48 GiB
    # cap with 256-pixel tiles ran out of memory (H200). Where a budget needs it, the planner decodes
    # in 128-pixel tiles: a quarter of the tile's area, the same pixels (the overlap is a quarter of
    # a tile either way), and far less than a quarter of the slack: under a 48 GiB cap the whole run
    # allocated 3.9 GiB above the weights and reserved 2.7 more, and group_offload allocated 3.9 GiB
    # above its resident weights (a tile's peak grows as its side to the power 2.5 here, not 2).
    # Denoising, from the same two runs: 40 per unit resident, 37 streamed.
    activations = ActivationTerms(
        resident=40.0,
        streamed=37.0,
        decode_per_pixel=100800.0,
        tiled_pixels=256 * 256 * 2,
        guidance_batch=1,
        tile_side=256,
        smaller_tiles=(128,),
        tile_scaling=2.5,
    )
    schedulers: ClassVar[dict[str, str]] = {"euler": "FlowMatchEulerDiscreteScheduler"}
    # The texts cut to their real tokens (attention.drop_text_padding), and their mask with them.
    text_length_inputs: ClassVar[tuple[str, ...]] = ("encoder_hidden_states", "attention_mask")

    # --- building ---

    def tiny(self, model: ModelConfig) -> HunyuanImageToVideo:
        """HunyuanVideo-1.5 I2V at toy scale (tiny.py)."""
        from batch_runner.families.hunyuan15.tiny import tiny_pipeline

        return tiny_pipeline(model)

    def assemble(self, model: ModelConfig, modules: dict[str, Any], arch: str) -> HunyuanImageToVideo:
        """The real architecture with random weights; the tokenizers are the tiny ones (their ids stay
        far below both vocabularies), lengths as the real ones (1000 language tokens, 256 glyph bytes)."""
        from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler
        from transformers import ByT5Tokenizer, SiglipImageProcessor

        from batch_runner.families.hunyuan15.tiny import tiny_qwen_tokenizer

        return self.pipeline_class(
            tokenizer=tiny_qwen_tokenizer(model.max_sequence_length),
            tokenizer_2=ByT5Tokenizer(),
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(arch_json(arch, "scheduler")),
            guider=ClassifierFreeGuidance(guidance_scale=model.guidance_scale),
            feature_extractor=SiglipImageProcessor(size={"height": 384, "width": 384}),
            **modules,
        )

    # --- rows ---

    def row_problems(
        self,
        model: ModelConfig,
        frames: int | None,
        height: int | None,
        width: int | None,
        steps: int | None = None,
    ) -> list[tuple[str, str]]:
        problems = super().row_problems(model, frames, None, None, steps)
        if height is None or width is None:
            return problems
        target = target_size_of(model)
        if (height, width) not in buckets(target):
            near_h, near_w = nearest_bucket(height, width, target)
            problems.append(
                (
                    "height/width",
                    f"{model.name} makes only its resolution's buckets (about {target}x{target} pixels, "
                    f"sides multiples of 16), not {width}x{height} (width x height); for that aspect ratio "
                    f"it makes width={near_w} height={near_h}",
                )
            )
        return problems

    def encode_prompts(self, pipe: Any, texts: list[str], model: ModelConfig, dtype: torch.dtype) -> list[tuple]:
        """(embedding, mask, glyph embedding, glyph mask) per text, each with a batch of 1: the
        pipeline takes all four precomputed, so a chunk's texts cross both encoders once."""
        embeds, masks, glyphs, glyph_masks = pipe.encode_prompt(
            prompt=texts, device=pipe._execution_device, dtype=dtype, batch_size=len(texts)
        )
        return [
            (e.unsqueeze(0), m.unsqueeze(0), g.unsqueeze(0), gm.unsqueeze(0))
            for e, m, g, gm in zip(embeds, masks, glyphs, glyph_masks, strict=True)
        ]

    def call_arguments(self, model: ModelConfig, job: Any, images: dict[str, Any], embeds: Any) -> dict[str, Any]:
        """No height/width: the pipeline takes the size from the image, already cropped to the row's
        bucket (row_problems). No max_sequence_length: the pipeline's own."""
        guided = job.guided
        prompt = embeds[job.prompt] or (None,) * 4
        negative = (embeds[job.negative_prompt] if guided else None) or (None,) * 4
        return {
            "image": images["image"],
            "prompt_embeds": prompt[0],
            "prompt_embeds_mask": prompt[1],
            "prompt_embeds_2": prompt[2],
            "prompt_embeds_mask_2": prompt[3],
            "negative_prompt_embeds": negative[0],
            "negative_prompt_embeds_mask": negative[1],
            "negative_prompt_embeds_2": negative[2],
            "negative_prompt_embeds_mask_2": negative[3],
            "num_frames": job.num_frames,
            "num_inference_steps": job.num_inference_steps,
            "guidance_scale": job.guidance_scale,
        }

    # --- structure ---

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return transformer.transformer_blocks

    def streamline(self, transformer: torch.nn.Module, model: ModelConfig) -> None:
        """Attention without the text's padding (attention.drop_text_padding), and the video's
        tokens row-major from the start: the patch embedding hands them over as
        `flatten(2).transpose(1, 2)`, which every block would keep (a block's outputs take its
        inputs' layout) and work through column-wise. Made contiguous here rather than at the first
        block (speed.SteadyInputs), the transposed original is freed at once."""
        from batch_runner.families.hunyuan15.attention import drop_text_padding

        drop_text_padding(transformer)
        transformer.x_embedder.register_forward_hook(_row_major)

    def geometry(self, configs: dict[str, dict]) -> Geometry:
        t, vae = configs["transformer"], configs["vae"]
        image = configs.get("image_encoder")
        image_tokens = (image["image_size"] // image["patch_size"]) ** 2 if image else IMAGE_TOKENS
        return HunyuanGeometry(
            extra_text=GLYPH_TOKENS + image_tokens,
            spatial=vae.get("spatial_compression_ratio") or 16,
            temporal=vae.get("temporal_compression_ratio") or 4,
            patch=t["patch_size"],
            patch_t=t["patch_size_t"],
            hidden=t["num_attention_heads"] * t["attention_head_dim"],
            text_in_sequence=True,
            vae_channels=max(vae["block_out_channels"]),
        )


@dataclass(frozen=True)
class HunyuanGeometry(Geometry):
    """Text in the sequence: the language model's tokens (max_sequence_length) plus the glyph and
    image tokens (`extra_text`), every one of them present (padding is masked, not removed)."""

    extra_text: int = GLYPH_TOKENS + IMAGE_TOKENS

    def tokens(self, frames: int, height: int, width: int, text_tokens: int) -> int:
        return super().tokens(frames, height, width, text_tokens + self.extra_text)


def _row_major(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


FAMILY = HunyuanVideo15()
