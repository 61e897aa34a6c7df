"""HunyuanVideo-1.5 image-to-video (Tencent), as diffusers ships it in `HunyuanVideo15ImageToVideoPipeline`.

Three encoders feed one 8.3B dual-stream transformer: a Qwen2.5-VL 7B language model (its hidden
states two layers from the top, 1000 tokens after the chat template's 108), a ByT5 glyph encoder
(256 tokens, run only on text quoted in the prompt) and a SigLIP image encoder (729 tokens). All
three join the video tokens in self-attention: diffusers pads them to 1985 tokens and masks the
padding; the runner's path drops it instead (`drop_text_padding`), so attention needs no mask.
The VAE compresses 16x16 pixels and 4 frames (frames 4N+1), one token per latent.

The size is not an argument of the pipeline: it takes the input image's aspect ratio and picks the
bucket of its resolution (`target_size`, 640 for 480p, 960 for 720p: sides multiples of 16 with
about target_size^2 pixels) whose ratio is nearest. The runner crops each input image to the row's
height x width first, so a row's height/width must be one of those buckets (a size the pipeline
maps to itself); any other size is refused with the bucket the pipeline would make for its ratio.
Thus the row's height and width are the video's real size, in results.parquet as everywhere else.

Guidance is a component (`guider`, diffusers' ClassifierFreeGuidance), not a call argument: the
pipeline class here takes `guidance_scale` per call and swaps in a guider with that scale. The
conditional and unconditional passes are separate forwards of batch 1.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch._dynamo  # diffusers imports it too: no start-up cost
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Transformer3DModel,
)
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0
from diffusers.pipelines.hunyuan_video1_5.image_processor import generate_crop_size_list
from transformers import (
    ByT5Tokenizer,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    Qwen2Tokenizer,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5EncoderModel,
)

from batch_runner.config import ModelConfig
from batch_runner.families.base import (
    DECODER,
    DENOISER,
    ENCODER,
    ActivationTerms,
    Family,
    Geometry,
    arch_json,
    local_source,
    seeded,
)

# The pipeline's fixed text lengths: ByT5 glyph tokens and SigLIP image tokens (27x27 patches of a
# 384-pixel image) join the language model's tokens in the sequence.
GLYPH_TOKENS = 256
IMAGE_TOKENS = 729
# The chat template's system prompt, cut off the language model's output (the pipeline's crop_start).
TEMPLATE_TOKENS = 108
TINY_TARGET = 64  # the tiny model's resolution: sizes near 64x64 pixels (buckets of 16 patches)


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
            guider = self.guider.new(guidance_scale=guidance_scale, enabled=guidance_scale > 1)
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


# --- attention without the text's padding ----------------------------------------------------------

# The transformer's text inputs, each with its mask: the language model's and the glyph encoder's.
TEXT_INPUTS = (
    ("encoder_hidden_states", "encoder_attention_mask"),
    ("encoder_hidden_states_2", "encoder_attention_mask_2"),
)


class PaddingFreeAttention(HunyuanVideo15AttnProcessor2_0):
    """diffusers' attention of the transformer blocks, without a mask when no text token is padding.

    Stock, every block builds a dense sequence x sequence mask to hide the texts' padding (most of
    their 1985 tokens): about 4 bytes per sequence^2 (10 GiB at 480p), and a mask rules out the flash
    and cuDNN kernels (480p steps ran at 199 TFLOP/s in the memory-efficient one). `drop_text_padding`
    takes the padded tokens out of the transformer's inputs, so nothing is left to mask; the output
    is the same, as text tokens carry no position (the rotary embedding is the video's) and padded
    ones are never attended to. `padded` says that the current forward kept its padding (a batch
    whose texts differ in length): diffusers' mask then, with the kernel SDPA picks for it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.padded = True

    # The explicit signature matters: diffusers drops keyword arguments a processor does not name.
    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query, key, value = (p(hidden_states).unflatten(2, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_q, text_k, text_v = (
            p(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((query, text_q), (key, text_k), (value, text_v)))

        mask, backend = None, self._attention_backend
        if self.padded:  # diffusers' mask: token i sees token j when both are real
            real = torch.nn.functional.pad(attention_mask, (query.shape[1] - attention_mask.shape[1], 0), value=True)
            real = real.bool()[:, None, None, :]
            mask, backend = real & real.transpose(2, 3), None
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=False,
            backend=backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)
        video, text = out[:, : -encoder_hidden_states.shape[1]], out[:, -encoder_hidden_states.shape[1] :]
        return attn.to_out[1](attn.to_out[0](video)), attn.to_add_out(text)


def drop_text_padding(transformer: HunyuanVideo15Transformer3DModel) -> None:
    """Give every block `PaddingFreeAttention` and the transformer a hook that cuts each text down to
    its real tokens before the forward (one host sync per forward, to count them).

    The text's length then varies from prompt to prompt: the blocks' hooks mark it as dynamic, so
    compiled blocks (speed.compile) make one graph for every length instead of one each.
    """
    processor = PaddingFreeAttention()
    for block in transformer.transformer_blocks:
        block.attn.set_processor(processor)
        block.register_forward_pre_hook(_text_length_is_dynamic)

    def cut(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        processor.padded = True
        masks = [kwargs.get(m) for _, m in TEXT_INPUTS]
        image = kwargs.get("image_embeds")
        if args or image is None or any(m is None for m in masks):
            return args, kwargs
        # Real tokens per text and sample, and whether the image's tokens are real (zeros: text-to-video).
        batch = masks[0].shape[0]
        *counts, image_real = torch.cat([*(m.bool().sum(1) for m in masks), (image != 0).any().view(1)]).tolist()
        lengths = [counts[i * batch : (i + 1) * batch] for i in range(len(masks))]
        if not image_real or any(len(set(per_sample)) > 1 for per_sample in lengths):
            return args, kwargs
        for (states, mask_name), per_sample in zip(TEXT_INPUTS, lengths, strict=True):
            mask, text = kwargs[mask_name].bool(), kwargs[states]
            kwargs[states] = text[mask].view(text.shape[0], per_sample[0], *text.shape[2:])
            kwargs[mask_name] = torch.ones(
                mask.shape[0], per_sample[0], dtype=kwargs[mask_name].dtype, device=mask.device
            )
        processor.padded = False
        return args, kwargs

    transformer.register_forward_pre_hook(cut, with_kwargs=True)


def _text_length_is_dynamic(block: torch.nn.Module, args: tuple) -> None:
    """A block's inputs: (video, text, temb, text mask, rotary embedding); the text's length is dim 1."""
    for tensor in (args[1], args[3]):
        torch._dynamo.maybe_mark_dynamic(tensor, 1)


# --- sizes ------------------------------------------------------------------------------------------


@functools.cache
def buckets(target_size: int, spatial: int = 16) -> tuple[tuple[int, int], ...]:
    """(height, width) of every size the pipeline makes at this resolution: the buckets it maps to
    themselves (a few of diffusers' buckets round to a neighbour and are never made)."""
    return tuple(b for b in generate_crop_size_list(target_size, spatial) if bucket_for(*b, target_size) == b)


def bucket_for(height: int, width: int, target_size: int, spatial: int = 16) -> tuple[int, int]:
    """The (height, width) the pipeline makes for an image of this size (its own rule, unchanged)."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=spatial)
    return tuple(processor.calculate_default_height_width(height, width, target_size))


def nearest_bucket(height: int, width: int, target_size: int) -> tuple[int, int]:
    """The made size for this aspect ratio: the pipeline's bucket, followed until it maps to itself."""
    size = (height, width)
    for _ in range(len(generate_crop_size_list(target_size, 16))):
        made = bucket_for(*size, target_size)
        if made == size:
            break
        size = made
    return size


def target_size_of(model: ModelConfig) -> int:
    """The checkpoint's resolution (the transformer's `target_size`), read without loading weights."""
    if model.arch:
        return int(arch_json(model.arch, "transformer")["target_size"])
    if model.weights == "pretrained" and model.path:
        source, _ = local_source(model)
        config = HunyuanVideo15Transformer3DModel.load_config(source, subfolder="transformer", revision=model.revision)
        return int(config.get("target_size", 640))
    return TINY_TARGET


# --- the tiny model's tokenizers --------------------------------------------------------------------


def tiny_qwen_tokenizer(max_length: int = 64) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer of Qwen2's class over single bytes (no merges): offline.

    Its chat template writes the system turn as exactly 108 tokens, as Qwen2.5-VL's template writes
    the pipeline's system prompt, so the pipeline's crop keeps exactly the user's text.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|endoftext|>", "<|sys|>", "<|user|>", "<|end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
        model_max_length=max_length + TEMPLATE_TOKENS,
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        + "<|sys|>" * TEMPLATE_TOKENS
        + "{% else %}<|user|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    )
    return tokenizer


class HunyuanVideo15(Family):
    name = "hunyuan15"
    pipeline_class = HunyuanImageToVideo
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
    # a tile either way). Denoising: 48 per unit, under the decode at both sizes.
    activations = ActivationTerms(
        resident=48.0,
        streamed=48.0,
        decode_per_pixel=100800.0,
        tiled_pixels=256 * 256 * 2,
        guidance_batch=1,
        tile_side=256,
        smaller_tiles=(128,),
    )
    schedulers: ClassVar[dict[str, str]] = {"euler": "FlowMatchEulerDiscreteScheduler"}

    def scheduler_overrides(self, model: ModelConfig) -> dict[str, Any]:
        return {} if model.flow_shift is None else {"shift": model.flow_shift}

    # --- building ---

    def tiny(self, model: ModelConfig) -> HunyuanImageToVideo:
        """HunyuanVideo-1.5 I2V at toy scale: every component of the real one (Qwen2.5-VL text model,
        ByT5-style T5 glyph encoder, SigLIP, the VAE compressing 16x16 pixels and 4 frames), random
        weights, tokenizers built in code. Resolution 64 (buckets of 16 latent pixels)."""
        with seeded(0):
            text_encoder = Qwen2_5_VLTextModel(
                Qwen2_5_VLTextConfig(
                    vocab_size=512,
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=3,
                    num_attention_heads=2,
                    num_key_value_heads=2,
                    rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                    rope_theta=1000000.0,
                    bos_token_id=None,
                    eos_token_id=None,
                )
            ).eval()
            text_encoder_2 = T5EncoderModel(
                T5Config(
                    vocab_size=384,
                    d_model=16,
                    d_kv=8,
                    d_ff=32,
                    num_layers=1,
                    num_heads=2,
                    relative_attention_num_buckets=8,
                    dropout_rate=0.0,
                )
            ).eval()
            image_encoder = SiglipVisionModel(
                SiglipVisionConfig(
                    hidden_size=12,
                    intermediate_size=24,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    image_size=32,
                    patch_size=8,
                )
            ).eval()
            transformer = HunyuanVideo15Transformer3DModel(
                in_channels=9,
                out_channels=4,
                num_attention_heads=2,
                attention_head_dim=8,
                num_layers=2,
                num_refiner_layers=1,
                mlp_ratio=2.0,
                text_embed_dim=16,
                text_embed_2_dim=16,
                image_embed_dim=12,
                rope_axes_dim=(2, 2, 4),
                target_size=TINY_TARGET,
                task_type="i2v",
            ).eval()
            vae = AutoencoderKLHunyuanVideo15(
                latent_channels=4,
                block_out_channels=(8, 8, 8, 8),
                layers_per_block=1,
                spatial_compression_ratio=16,
                temporal_compression_ratio=4,
                downsample_match_channel=False,
                upsample_match_channel=False,
            ).eval()
        return HunyuanImageToVideo(
            text_encoder=text_encoder,
            tokenizer=tiny_qwen_tokenizer(),
            transformer=transformer,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=model.flow_shift or 5.0),
            text_encoder_2=text_encoder_2,
            tokenizer_2=ByT5Tokenizer(),
            guider=ClassifierFreeGuidance(guidance_scale=model.guidance_scale),
            image_encoder=image_encoder,
            feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
        )

    def assemble(self, model: ModelConfig, modules: dict[str, Any], arch: str) -> HunyuanImageToVideo:
        """The real architecture with random weights; the tokenizers are the tiny ones (their ids stay
        far below both vocabularies), lengths as the real ones (1000 language tokens, 256 glyph bytes)."""
        return HunyuanImageToVideo(
            tokenizer=tiny_qwen_tokenizer(model.max_sequence_length),
            tokenizer_2=ByT5Tokenizer(),
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(arch_json(arch, "scheduler")),
            guider=ClassifierFreeGuidance(guidance_scale=model.guidance_scale),
            feature_extractor=SiglipImageProcessor(size={"height": 384, "width": 384}),
            **modules,
        )

    # --- rows ---

    def row_problems(
        self, model: ModelConfig, frames: int | None, height: int | None, width: int | None
    ) -> list[tuple[str, str]]:
        problems = [p for p in super().row_problems(model, frames, None, None)]
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
        guided = job.guidance_scale > 1
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

    def streamline(self, transformer: torch.nn.Module) -> None:
        drop_text_padding(transformer)

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


FAMILY = HunyuanVideo15()
