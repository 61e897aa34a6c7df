"""Kandinsky 5.0 image-to-video (Kandinsky Lab), as diffusers ships it in `Kandinsky5I2VPipeline`.

One pipeline class, two checkpoints: Lite (2B, 32 visual blocks of width 1792) and Pro (19B, 60 of
width 4096). Two text encoders: Qwen2.5-VL 7B (its last hidden states after the pipeline's
128-token system template, cross-attended by every visual block and first refined by the
transformer's own text blocks) and CLIP ViT-L/14's text model (its pooled output joins the timestep
embedding). The VAE is HunyuanVideo's (8x8 pixels and 4 frames a latent), the transformer takes
1x2x2 latents a token; text stays out of the self-attention sequence. The row's image is the first
latent frame (never denoised) and, with a mask, a conditioning channel: there is no last frame.

Its attention goes through diffusers' attention dispatcher (`set_attention_backend`); the visual
blocks are the repeated ones compiled one by one and streamed (the few text blocks stay resident).
The conditional and unconditional passes are separate forwards of batch 1.

After denoising the pipeline renormalises the first four latent frames against the next five
(`normalize_first_frame`): with fewer than five latent frames (under 17 frames) there is nothing to
renormalise against and the video comes out NaN, so rows need at least 17 frames.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from batch_runner.families.rules import valid_frame_counts
from batch_runner.families.tokenizer import tiny_qwen25_vl, tiny_tokenizer

if TYPE_CHECKING:
    from diffusers import Kandinsky5I2VPipeline
    from transformers import Qwen2Tokenizer

# normalize_first_frame renormalises 4 latent frames against the next ones: 5 latent frames at least.
MIN_FRAMES = 17
CLIP_LENGTH = 77  # the pipeline's CLIP token count
TINY_TEXT = 16


def tiny_qwen_tokenizer(max_length: int = 64) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer of Qwen2's class over single bytes (no merges): offline.

    The pipeline crops the language model's output after a fixed 128 tokens, which is what
    Qwen2.5-VL's tokenizer makes of its system template. Here the template's first part is one
    added token and its last 127 characters one token each, so the crop keeps exactly the user's text.
    """
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    template, start = _prompt_template()
    prefix = template.split("{}")[0]
    vocab = {"<|endoftext|>": 0}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=max_length + start,
    )
    head = AddedToken(prefix[: len(prefix) - (start - 1)], normalized=False, special=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [head]})
    return tokenizer


def _prompt_template() -> tuple[str, int]:
    """The pipeline's Qwen template and the tokens it crops, read from the pipeline itself."""
    empty = FAMILY.pipeline_class(
        transformer=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        scheduler=None,
    )
    return empty.prompt_template, empty.prompt_template_encode_start_idx


class Kandinsky5(Family):
    name = "kandinsky5"
    pipeline_class = imported("diffusers:Kandinsky5I2VPipeline")
    roles: ClassVar[dict[str, str]] = {
        "text_encoder": ENCODER,
        "text_encoder_2": ENCODER,
        "transformer": DENOISER,
        "vae": DECODER,
    }
    # Denoising: Wan's 16 bytes per token and width, raised to 24 as this transformer keeps its
    # modulation and rotary arithmetic in float32 (an estimate). Decoding, measured: Lite at its
    # default (121 frames at 768x512, 31 x 32 x 48 tokens) under `none` with whole-frame decoding
    # allocated 42.0 GiB and reserved 46.0 on an H200 (docs/benchmarks.json, 2026-12-04) over 19.9
    # GiB of weights: the HunyuanVideo VAE (512 channels at its widest) decodes every frame at once,
    # so its decode grows with the frames as well as the area (as LTX-Video's), 58000 bytes per
    # pixel at 121 frames. Tiled (the VAE's 256-pixel tiles, 16 frames at a time), measured on the
    # same card (2026-12-04, code fc8e5ce): text_offload under a 24 GiB cap allocated 8.69 GiB over
    # 4.2 of resident weights, group_offload under 12 allocated 4.44 over 0.6: about 3.5-4.5 GiB of
    # activations, which one 256 x 256 tile's worth of pixels gives (3.5 GiB; the fragmentation
    # allowance covers the rest). Streamed, measured on an H100 (2026-12-05, code 084d074): Pro at
    # its default under group_offload (24 GiB cap, tiled decode) allocated at most 4.50 GiB, over
    # 0.46 of VAE, 0.06 of weights outside the block lists and two 0.57 GiB blocks: at most 2.84 GiB
    # of denoising activations, 15.6 bytes per token and width, charged 16.
    activations = ActivationTerms(
        resident=24.0,
        streamed=16.0,
        decode_per_pixel=58000.0,
        tiled_pixels=256 * 256,
        guidance_batch=1,
        decode_frames=121,
    )
    schedulers: ClassVar[dict[str, str]] = {"euler": "FlowMatchEulerDiscreteScheduler"}
    # diffusers' pipeline encodes each prompt with its own token count (no padding to a fixed length).
    text_length_inputs: ClassVar[tuple[str, ...]] = ("text_embed",)

    # --- building ---

    def tiny(self, model: ModelConfig) -> Kandinsky5I2VPipeline:
        """Kandinsky 5 I2V at toy scale: every component of the real one (Qwen2.5-VL with its vision
        tower, CLIP's text model, the HunyuanVideo VAE, the visual-conditioned transformer), random
        weights, tokenizers built in code."""
        from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, Kandinsky5Transformer3DModel
        from transformers import CLIPTextConfig, CLIPTextModel

        qwen_tokenizer = tiny_qwen_tokenizer(model.max_sequence_length)
        clip_tokenizer = tiny_tokenizer(CLIP_LENGTH)
        with seeded(0):
            text_encoder = tiny_qwen25_vl(len(qwen_tokenizer), TINY_TEXT)
            text_encoder_2 = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=clip_tokenizer.vocab_size,
                    hidden_size=TINY_TEXT,
                    intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    max_position_embeddings=CLIP_LENGTH,
                    pad_token_id=0,
                    bos_token_id=0,
                    eos_token_id=clip_tokenizer.eos_token_id,  # pooled at the first end-of-text
                )
            ).eval()
            transformer = Kandinsky5Transformer3DModel(
                in_visual_dim=4,
                out_visual_dim=4,
                in_text_dim=TINY_TEXT,
                in_text_dim2=TINY_TEXT,
                time_dim=16,
                model_dim=32,
                ff_dim=64,
                num_text_blocks=1,
                num_visual_blocks=2,
                axes_dims=(8, 4, 4),
                visual_cond=True,
            )
            vae = AutoencoderKLHunyuanVideo(
                latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=2
            ).eval()
        return self.pipeline_class(
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=qwen_tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=clip_tokenizer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=model.flow_shift or 5.0),
        )

    def assemble(self, model: ModelConfig, modules: dict[str, Any], arch: str) -> Kandinsky5I2VPipeline:
        """The real architecture with random weights; the tokenizers are the tiny ones (their ids stay
        far below both vocabularies), the Qwen one cropping as the real one does."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return self.pipeline_class(
            tokenizer=tiny_qwen_tokenizer(model.max_sequence_length),
            tokenizer_2=tiny_tokenizer(CLIP_LENGTH),
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(arch_json(arch, "scheduler")),
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
        """The shared rules, with at least MIN_FRAMES frames (see the module's docstring)."""
        problems = super().row_problems(model, None, height, width, steps)
        if frames is not None:
            valid = [n for n in valid_frame_counts(model) if n >= MIN_FRAMES]
            if frames not in valid:
                nearest = min(valid, key=lambda v: (abs(v - frames), -v))
                rule = f"{model.frame_multiple}N+1 frames, {valid[0]} to {valid[-1]}"
                problems.insert(
                    0, ("num_frames", f"{model.name} makes {rule}, not {frames}; the nearest valid value is {nearest}")
                )
        return problems

    def encode_prompts(self, pipe: Any, texts: list[str], model: ModelConfig, dtype: torch.dtype) -> list[tuple]:
        """(Qwen embedding, CLIP pooled embedding, cumulative lengths) per text, each with a batch of 1.

        One text at a time: the pipeline pads a batch to its longest text and the transformer has
        no text mask, so a text encoded alone is what the pipeline itself would give it.
        """
        embedded = []
        for text in texts:
            qwen, clip, lengths = pipe.encode_prompt(
                prompt=[text], max_sequence_length=model.max_sequence_length, device=pipe._execution_device, dtype=dtype
            )
            embedded.append((qwen, clip, lengths))
        return embedded

    def call_arguments(self, model: ModelConfig, job: Any, images: dict[str, Any], embeds: Any) -> dict[str, Any]:
        guided = job.guided
        # None where a caller gives the texts as text instead (the GPU tests' reference recipe).
        prompt = embeds[job.prompt] or (None, None, None)
        negative = (embeds[job.negative_prompt] if guided else None) or (None, None, None)
        return {
            "image": images["image"],
            "prompt_embeds_qwen": prompt[0],
            "prompt_embeds_clip": prompt[1],
            "prompt_cu_seqlens": prompt[2],
            "negative_prompt_embeds_qwen": negative[0],
            "negative_prompt_embeds_clip": negative[1],
            "negative_prompt_cu_seqlens": negative[2],
            "height": job.height,
            "width": job.width,
            "num_frames": job.num_frames,
            "num_inference_steps": job.num_inference_steps,
            "guidance_scale": job.guidance_scale,
            "max_sequence_length": model.max_sequence_length,
        }

    # --- structure ---

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return transformer.visual_transformer_blocks

    def streamline(self, transformer: torch.nn.Module, model: ModelConfig) -> None:
        """Its attention modules say they can fuse their projections, but diffusers' fusing looks for
        `to_q`/`to_k`/`to_v` and these are `to_query`/`to_key`/`to_value` (AttributeError), and the
        processor would not read a fused one anyway: each says it cannot, so speed.fuse_qkv passes by."""
        from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Attention

        for module in transformer.modules():
            if isinstance(module, Kandinsky5Attention):
                module._supports_qkv_fusion = False

    def attention_head_size(self, transformer_config: Mapping[str, Any]) -> int | None:
        """Kandinsky 5's heads are as wide as its rotary axes together (64 for Lite, 128 for Pro);
        its config names no `attention_head_dim`."""
        return sum(transformer_config["axes_dims"])

    def geometry(self, configs: dict[str, dict]) -> Geometry:
        t, vae = configs["transformer"], configs["vae"]
        patch_t, patch, _ = t["patch_size"]
        return Geometry(
            spatial=vae["spatial_compression_ratio"],
            temporal=vae["temporal_compression_ratio"],
            patch=patch,
            patch_t=patch_t,
            hidden=t["model_dim"],
            text_in_sequence=False,
            vae_channels=max(vae["block_out_channels"]),
        )


FAMILY = Kandinsky5()
