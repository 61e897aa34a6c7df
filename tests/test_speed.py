"""Speed settings that must leave outputs unchanged, checked on the tiny model on the CPU."""

from __future__ import annotations

import pytest
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


def test_compiled_blocks_are_handed_row_major_tensors_with_one_set_of_strides():
    """speed.SteadyInputs: a transposed input is copied row-major; a contiguous one whose size-1
    dimension has another stride (dynamo's guards tell the two apart) becomes a view with the
    row-major strides; a row-major one is passed as it is."""

    class Block(torch.nn.Module):
        def forward(self, hidden_states: torch.Tensor, text: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            self.seen = (hidden_states, text)
            return hidden_states * scale

    block = Block()
    block.register_forward_pre_hook(speed.SteadyInputs(block.forward, ["text"]), with_kwargs=True)
    transposed = torch.randn(1, 8, 6).transpose(1, 2)
    odd = torch.randn(1, 6, 8).as_strided((1, 6, 8), (8, 8, 1))
    assert odd.is_contiguous() and odd.stride() != (48, 8, 1)
    out = block(transposed, text=odd, scale=2.0)
    hidden, text = block.seen
    assert hidden.is_contiguous() and hidden.stride() == (48, 8, 1) and torch.equal(hidden, transposed)
    assert text.stride() == (48, 8, 1) and text.data_ptr() == odd.data_ptr() and torch.equal(text, odd)
    assert torch.equal(out, transposed * 2.0)
    row_major = torch.randn(1, 6, 8)
    block(row_major, row_major)
    assert block.seen[0] is row_major


def test_a_text_input_the_blocks_do_not_take_is_refused_at_once():
    class Block(torch.nn.Module):
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return hidden_states

    with pytest.raises(ValueError, match=r"takes no \['text_embed'\]"):
        speed.SteadyInputs(Block().forward, ["text_embed"])
