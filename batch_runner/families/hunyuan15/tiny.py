"""HunyuanVideo-1.5 at toy scale, built in code: offline, seconds on a CPU (the tests and the quickstart)."""

from __future__ import annotations

from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Transformer3DModel,
)
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
from batch_runner.families.base import seeded
from batch_runner.families.hunyuan15.buckets import TINY_TARGET
from batch_runner.families.hunyuan15.pipeline import HunyuanImageToVideo

# The chat template's system prompt, cut off the language model's output (the pipeline's crop_start).
TEMPLATE_TOKENS = 108


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


def tiny_pipeline(model: ModelConfig) -> HunyuanImageToVideo:
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
