"""The rotary embedding of Wan's attention written for one fused pass (families/wan_attention.py):
the same numbers as diffusers' processors, for every model of the architecture."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from hypothesis import given, settings
from hypothesis import strategies as st

from batch_runner.families import family_named
from batch_runner.families.wan_attention import PairedRotaryAttention, rotate, rotation_tables
from batch_runner.replica import speed
from batch_runner.replica.pipeline import build_pipeline

from .conftest import run_config


def _diffusers_rotation(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """diffusers 0.42.1's `apply_rotary_emb` inside WanAttnProcessor.__call__, verbatim."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 7),
    heads=st.integers(1, 3),
    pairs=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
    repeated=st.booleans(),
)
def test_the_paired_rotation_is_bit_for_bit_diffusers(tokens, heads, pairs, dtype, seed, repeated):
    """Any tables (diffusers' repeat each pair's angle over its two channels; others need not), any dtype."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, tokens, heads, 2 * pairs, generator=generator) * 4).to(dtype)
    angles = torch.randn(1, tokens, 1, pairs if repeated else 2 * pairs, generator=generator) * 5
    if repeated:
        angles = angles.repeat_interleave(2, dim=-1)
    freqs_cos, freqs_sin = angles.cos(), angles.sin()
    made = rotate(x, *rotation_tables(freqs_cos, freqs_sin))
    assert made.dtype == dtype
    assert torch.equal(made, _diffusers_rotation(x, freqs_cos, freqs_sin))


def _inputs(transformer: torch.nn.Module, seed: int = 0) -> dict:
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(1, config.in_channels, 3, 4, 6, generator=generator),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 512, config.text_dim, generator=generator),
        "return_dict": False,
    }
    if config.image_dim is not None:
        inputs["encoder_hidden_states_image"] = torch.randn(1, 5, config.image_dim, generator=generator)
    return inputs


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-wan22-ti2v", "tiny-skyreels"])
@pytest.mark.parametrize("fused", [False, True])
def test_streamlined_transformers_make_diffusers_output_exactly(name, fused):
    """Image keys and values (Wan 2.1 I2V, SkyReels-V2) or none (Wan 2.2 TI2V), fused projections or not."""
    model = run_config("manifest=x", f"model={name}").model
    family = family_named(model.family)
    stock, ours = build_pipeline(model).transformer, build_pipeline(model).transformer
    family.streamline(ours, model)
    if fused:
        speed.fuse_qkv(stock)
        speed.fuse_qkv(ours)
    attentions = [m for m in ours.modules() if hasattr(m, "set_processor") and hasattr(m, "norm_q")]
    assert attentions and all(isinstance(m.processor, PairedRotaryAttention) for m in attentions)
    with torch.no_grad():
        expected = stock(**_inputs(stock))[0]
        made = ours(**_inputs(ours))[0]
    assert torch.equal(made, expected)


def test_the_attention_kernel_chosen_reaches_the_paired_processor():
    """The backend diffusers' `set_attention_backend` sets lands on the processor the calls use."""
    model = run_config("manifest=x", "model=tiny-wan").model
    transformer = build_pipeline(model).transformer
    family_named(model.family).streamline(transformer, model)
    transformer.set_attention_backend("_native_math")
    processors = {id(m.processor) for m in transformer.modules() if hasattr(m, "set_processor")}
    assert len(processors) == 1
    processor = transformer.blocks[0].attn1.processor
    assert processor._attention_backend == AttentionBackendName("_native_math")
    assert not isinstance(processor, WanAttnProcessor)
