"""Tokenizers and text encoders that need no download: for the tiny pipelines and the random-weight benchmarks."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import T5TokenizerFast

TINY_TEXT_DIM = 32
WORDS = [
    "a",
    "the",
    "of",
    "and",
    "to",
    "in",
    "on",
    "with",
    "at",
    "by",
    "is",
    "are",
    "sea",
    "sky",
    "sun",
    "light",
    "night",
    "city",
    "car",
    "tree",
    "water",
]


def tiny_tokenizer(max_length: int = 64) -> T5TokenizerFast:
    """A T5 tokenizer over characters and a few words: a real `tokenizers` Unigram model, offline.

    Uppercase and lowercase pieces are both in the vocabulary, so nothing depends on a normalizer
    (which save_pretrained/from_pretrained might not carry over identically). Wan's UMT5 and
    CogVideoX's T5 both take a T5 tokenizer; its ids stay far below either vocabulary's size.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [(f"▁{w}", -1.0) for w in WORDS]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def tiny_text_encoder(model_class: type, config_class: type, vocab_size: int) -> torch.nn.Module:
    """A two-layer T5-style encoder (T5 for CogVideoX, UMT5 for Wan) of width 32, in eval mode."""
    config = config_class(
        vocab_size=vocab_size,
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    return model_class(config).eval()


def tiny_qwen25_vl(vocab_size: int, hidden: int, layers: int = 2) -> torch.nn.Module:
    """Qwen2.5-VL with its vision tower at toy scale (Kandinsky 5's and Cosmos-Predict2.5's text
    encoder), random weights, in eval mode: every part the pipelines call, multimodal rotary
    positions included."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 32,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    vision_config = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": hidden,
        "patch_size": 2,
        "spatial_merge_size": 1,
        "temporal_patch_size": 1,
        "window_size": 4,
        "fullatt_block_indexes": [0],
    }
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config)
    return Qwen2_5_VLForConditionalGeneration(config).eval()
