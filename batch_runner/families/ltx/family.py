"""LTX-Video as the runner asks a family: its build, its call, its memory terms (the package's docstring
says which pipeline and why)."""

from __future__ import annotations

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
)
from batch_runner.families.tokenizer import TINY_TEXT_DIM, tiny_text_encoder, tiny_tokenizer

if TYPE_CHECKING:
    from batch_runner.families.ltx.pipeline import LTXCondition

# The VAE of 0.9.1 and later denoises while it decodes: diffusers' LTX-Video page and Lightricks'
# configs (configs/ltxv-2b-0.9.5.yaml, ltxv-13b-0.9.7-dev.yaml) use decode_timestep 0.05 and noise
# scale 0.025 for these "timestep-aware" VAEs. The pipeline ignores both where the VAE has no
# timestep conditioning (0.9.0). Every configured checkpoint uses the same values, so they live here
# rather than in ModelConfig.
DECODE_TIMESTEP = 0.05
DECODE_NOISE_SCALE = 0.025
# Guidance rescale (arXiv 2305.08891): Lightricks' 0.9.5 config has rescaling_scale 0.7 (the same
# blend as diffusers' guidance_rescale) and diffusers' 13B examples pass guidance_rescale=0.7.
GUIDANCE_RESCALE = 0.7
# Noise on the conditioning frame's latent, scaled by t^2 each step: "helps with motion continuity,
# especially when conditioned on a single frame" (the pipeline); 0.15 is both the pipeline's and
# Lightricks' inference.py default.
IMAGE_COND_NOISE_SCALE = 0.15


class LTX(Family):
    name = "ltx"
    # Not split across GPUs (replica.gpus > 1): diffusers 0.42's LTX `_cp_plan` leaves the per-token
    # timestep unsplit (the condition pipeline passes one, as the image-to-video one does), and the
    # text attention mask, repeated per head, does not fit Ulysses' share of the heads (both failed
    # on the CPU with tiny-ltx through LTXImageToVideoPipeline).
    context_parallel = False
    pipeline_class = imported("batch_runner.families.ltx.pipeline:LTXCondition")
    roles: ClassVar[dict[str, str]] = {"text_encoder": ENCODER, "transformer": DENOISER, "vae": DECODER}
    # Fitted to the 2B 0.9.5 on an H100 (docs/benchmarks.json, 161x512x768, 40 steps): 18.8 GiB
    # allocated and 23.8 reserved with everything resident (weights 14.8), 7.9 allocated streamed.
    # Guidance runs as one batch of 2 (pipeline_ltx_condition.py concatenates the embeddings and
    # latents). The peak is the VAE's: it decodes every frame at once (it tiles space only). Measured
    # at the default 161 frames (docs/benchmarks.json), the decode allocates 4.05 GiB above the
    # resident weights under every plan and both sizes, and a cap needs ~2 GiB more for the
    # allocator's slack around its buffers (text_offload of the 2B ran out of memory under a 12 GiB
    # cap at 9.96 GiB allocated): 4.5 GiB before the planner's fragmentation factor, 6150 bytes per
    # pixel at 161 frames. The decode grows with the frames too: an H200 run of the 13B at 12 GiB
    # (docs/experiments/2026-12-04) peaked at 8.0 GiB for 480x1216x97 and 8.6 for 768x512x161, in
    # proportion to frames x area; by area alone the first was estimated at 1.36x its peak. The same
    # run's 8.6 GiB is 1.3x the H100 benchmark's 6.65 for that shape and plan (compile on, CUDA 13):
    # the estimate sits between the two. An out-of-memory error steps the replica down a plan.
    # Whole frames against tiles: the 8.6 GiB of the 13B at H200 decoded whole frames (planner2's
    # choice where they fit), the H100's 6.65 tiles of 512x512 (diffusers' own). The 13B distilled
    # on the H200 (docs/benchmarks.json, 2026-12-04), whole frames, reserved 47.8 GiB under `none`
    # and allocated 8.6 under a 24 GiB group_offload: 9400 bytes per pixel at 161 frames, over one
    # 512x512 tile where the VAE tiles (the H100's records, tiled, stay within 1.3x of it).
    # The denoising term stays the placeholder between Wan's and CogVideoX's fits: always under the decode.
    activations = ActivationTerms(
        resident=24.0,
        streamed=24.0,
        decode_per_pixel=9400.0,
        tiled_pixels=512 * 512,
        guidance_batch=2,
        decode_frames=161,
    )
    schedulers: ClassVar[dict[str, str]] = {"euler": "FlowMatchEulerDiscreteScheduler"}

    # --- building ---

    def tiny(self, model: ModelConfig) -> LTXCondition:
        """LTX at toy scale: the same classes and code paths (timestep-aware VAE decoding included),
        random weights. The VAE compresses 8x8 pixels and 8 frames (patch 1, three 2x scalings), so
        the tiny model keeps the real one's 8N+1 frame rule."""
        from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
        from transformers import T5Config, T5EncoderModel

        tokenizer = tiny_tokenizer()
        with seeded(0):
            text_encoder = tiny_text_encoder(T5EncoderModel, T5Config, tokenizer.vocab_size)
            transformer = LTXVideoTransformer3DModel(
                in_channels=8,
                out_channels=8,
                patch_size=1,
                patch_size_t=1,
                num_attention_heads=2,
                attention_head_dim=8,
                cross_attention_dim=16,
                num_layers=2,
                caption_channels=TINY_TEXT_DIM,
            )
            vae = AutoencoderKLLTXVideo(
                in_channels=3,
                out_channels=3,
                latent_channels=8,
                block_out_channels=(8, 8, 8, 8),
                decoder_block_out_channels=(8, 8, 8, 8),
                layers_per_block=(1, 1, 1, 1, 1),
                decoder_layers_per_block=(1, 1, 1, 1, 1),
                spatio_temporal_scaling=(True, True, True, False),
                decoder_spatio_temporal_scaling=(True, True, True, False),
                decoder_inject_noise=(False, False, False, False, False),
                upsample_residual=(False, False, False, False),
                upsample_factor=(1, 1, 1, 1),
                timestep_conditioning=True,
                patch_size=1,
                patch_size_t=1,
                encoder_causal=True,
                decoder_causal=False,
            )
        return self.pipeline_class(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(arch_json("ltx-video-0.9.5", "scheduler")),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )

    def assemble(self, model: ModelConfig, modules: dict[str, Any], arch: str) -> LTXCondition:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return self.pipeline_class(
            tokenizer=tiny_tokenizer(model.max_sequence_length),
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(arch_json(arch, "scheduler")),
            **modules,
        )

    # --- rows ---

    def encode_prompts(
        self, pipe: Any, texts: list[str], model: ModelConfig, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(embedding (1, tokens, dim), attention mask (1, tokens)) per text: LTX's transformer masks
        the padding of the text in cross-attention, so the mask travels with the embedding."""
        embedded, masks, _, _ = pipe.encode_prompt(
            prompt=texts,
            do_classifier_free_guidance=False,
            max_sequence_length=model.max_sequence_length,
            device=pipe._execution_device,
            dtype=dtype,
        )
        return [(e.unsqueeze(0), m.unsqueeze(0)) for e, m in zip(embedded, masks, strict=True)]

    def call_arguments(self, model: ModelConfig, job: Any, images: dict[str, Any], embeds: Any) -> dict[str, Any]:
        """The row's image as the condition at frame 0 (strength 1). A text whose embedding is None
        (diffusers' own recipe, which encodes the prompt itself) passes no embedding and no mask."""
        from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

        guided = job.guided
        prompt, prompt_mask = embeds[job.prompt] or (None, None)
        negative, negative_mask = (embeds[job.negative_prompt] if guided else None) or (None, None)
        return {
            "conditions": [LTXVideoCondition(image=images["image"], frame_index=0)],
            "prompt_embeds": prompt,
            "prompt_attention_mask": prompt_mask,
            "negative_prompt_embeds": negative,
            "negative_prompt_attention_mask": negative_mask,
            "height": job.height,
            "width": job.width,
            "num_frames": job.num_frames,
            # Divides the rotary positions in time: the video's own frame rate.
            "frame_rate": job.fps,
            "num_inference_steps": job.num_inference_steps,
            "guidance_scale": job.guidance_scale,
            "guidance_rescale": GUIDANCE_RESCALE,
            "image_cond_noise_scale": IMAGE_COND_NOISE_SCALE,
            "decode_timestep": DECODE_TIMESTEP,
            "decode_noise_scale": DECODE_NOISE_SCALE,
            "max_sequence_length": model.max_sequence_length,
        }

    # --- structure ---

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return transformer.transformer_blocks

    def geometry(self, configs: dict[str, dict]) -> Geometry:
        t, vae = configs["transformer"], configs["vae"]
        scalings = 2 ** sum(vae["spatio_temporal_scaling"])
        return Geometry(
            spatial=vae.get("spatial_compression_ratio") or vae["patch_size"] * scalings,
            temporal=vae.get("temporal_compression_ratio") or vae["patch_size_t"] * scalings,
            patch=t["patch_size"],
            patch_t=t["patch_size_t"],
            hidden=t["num_attention_heads"] * t["attention_head_dim"],
            text_in_sequence=False,
            vae_channels=max(vae["decoder_block_out_channels"]),
        )


FAMILY = LTX()
