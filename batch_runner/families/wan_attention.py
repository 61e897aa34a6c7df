"""Wan 2.1's attention with its rotary embedding written for one fused pass: the runner's change to
the transformers of Wan 2.1/2.2 and SkyReels-V2 (the same architecture), made by `Family.streamline`.

diffusers 0.42.1's processors (`WanAttnProcessor`, `SkyReelsV2AttnProcessor`, the same code) rotate
the queries and keys by writing the even and the odd channels of an empty tensor in two slice
assignments. Compiled with the RMS norm before it, that became one reduction kernel over the
5120-wide rows that took 0.178 s of SkyReels' 540p step on an H200 (2.2 ms a call), nearly four times
the cross-attention's query norm per byte (docs/experiments/2026-12-05). Here each channel j is
`x[j] * cos[j] + x[j ^ 1] * sin±[j]`: the same float32 products and sums per channel, so eagerly
the output is bit for bit diffusers' (tests/test_wan_attention.py), and one elementwise expression
for the compiler to fuse into the norm: 0.095 s a step, measured (docs/experiments/2026-12-05b).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

# The text encoder's context length: the cross-attention's keys past it are the image's (diffusers'
# processors hard-code the same 512).
TEXT_CONTEXT = 512


def rotation_tables(freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel factors of the pairwise rotation: channel 2i and 2i+1 both take pair i's cosine;
    the sine enters channel 2i negated (it multiplies x[2i+1]) and channel 2i+1 as it is (x[2i]).
    diffusers reads pair i's cosine at channel 2i and its sine at channel 2i+1; so do these."""
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`x` (batch, tokens, heads, head size) rotated pairwise by `rotation_tables`' factors, in
    float32 as diffusers does (its tables are float32), returned in `x`'s dtype."""
    partners = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # channel j holds x[j ^ 1]
    return (x * cos + partners * signed_sin).type_as(x)


class PairedRotaryAttention:
    """diffusers' Wan/SkyReels-V2 attention processor with `rotate` for its rotary embedding.

    The rest is Wan's, step for step: fused or separate projections (`fuse_qkv_projections`), made by
    diffusers' own helpers (SkyReels-V2's module has copies of them); the queries' and keys' RMS
    norms over all heads; the image's keys and values for image-to-video models (the encoder states
    past the text's 512 tokens); both attentions through diffusers' dispatcher with the backend and
    context-parallel config set on this processor; and the output projection.
    """

    _attention_backend = None
    _parallel_config = None

    # The explicit signature matters: diffusers drops keyword arguments a processor does not name.
    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        image_states = None
        if attn.add_k_proj is not None:
            image_length = encoder_hidden_states.shape[1] - TEXT_CONTEXT
            image_states = encoder_hidden_states[:, :image_length]
            encoder_hidden_states = encoder_hidden_states[:, image_length:]
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            cos, signed_sin = rotation_tables(*rotary_emb)
            query, key = rotate(query, cos, signed_sin), rotate(key, cos, signed_sin)

        image_out = None
        if image_states is not None:
            key_image, value_image = _get_added_kv_projections(attn, image_states)
            key_image = attn.norm_added_k(key_image).unflatten(2, (attn.heads, -1))
            value_image = value_image.unflatten(2, (attn.heads, -1))
            image_out = self._attend(query, key_image, value_image, None, split=False)
        # Only the self-attention's keys are split over a context-parallel team: the text's and the
        # image's are whole on every GPU (huggingface/diffusers#12909: diffusers' SkyReels-V2 copy
        # of this processor passes the config to every attention, as Wan's did before that change).
        out = self._attend(query, key, value, attention_mask, split=encoder_hidden_states is None)
        if image_out is not None:
            out = out + image_out
        return attn.to_out[1](attn.to_out[0](out))

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, split: bool
    ) -> torch.Tensor:
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config if split else None,
        )
        return out.flatten(2, 3).type_as(query)


def pair_rotary(transformer: torch.nn.Module) -> None:
    """Give every attention of a Wan-architecture transformer `PairedRotaryAttention`."""
    processor = PairedRotaryAttention()
    for module in transformer.modules():
        if hasattr(module, "set_processor") and hasattr(module, "norm_q"):
            module.set_processor(processor)
