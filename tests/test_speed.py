"""Speed settings that must leave outputs unchanged, checked on the tiny model on the CPU."""

from __future__ import annotations

import torch

from batch_runner.replica import speed
from batch_runner.replica.pipeline import build_pipeline

from .conftest import run_config


def transformer_inputs(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    frames = (config.sample_frames - 1) // config.temporal_compression_ratio + 1
    return {
        "hidden_states": torch.randn(
            2, frames, config.in_channels, config.sample_height, config.sample_width, generator=generator
        ),
        "encoder_hidden_states": torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=generator),
        "timestep": torch.tensor([500, 500]),
    }


def test_fused_qkv_gives_the_same_output_and_drops_the_separate_projections():
    transformer = build_pipeline(run_config("manifest=x", "model=tiny").model).transformer.eval()
    inputs = transformer_inputs(transformer)
    with torch.no_grad():
        before = transformer(**inputs, return_dict=False)[0]
    weights_before = sum(p.numel() for p in transformer.parameters())
    attention = transformer.transformer_blocks[0].attn1
    separate = sum(
        p.numel() * p.element_size() for n in ("to_q", "to_k", "to_v") for p in getattr(attention, n).parameters()
    )

    dropped = speed.fuse_qkv(transformer)

    assert dropped == separate * len(transformer.transformer_blocks)
    assert isinstance(attention.to_q, speed.DroppedProjection) and attention.to_qkv is not None
    assert not any(".to_q." in name or ".to_k." in name for name, _ in transformer.named_parameters())
    # The fused projection holds exactly what the three held: no weight is lost or kept twice.
    assert sum(p.numel() for p in transformer.parameters()) == weights_before
    with torch.no_grad():
        after = transformer(**inputs, return_dict=False)[0]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
