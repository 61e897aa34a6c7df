"""LTX-Video's pipeline as the runner builds it: diffusers' `LTXConditionPipeline`, with an attention
processor that reads the fused projection `speed.fuse_qkv` leaves (the package's docstring says why this pipeline)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLLTXVideo,
    FlowMatchEulerDiscreteScheduler,
    LTXConditionPipeline,
    LTXVideoTransformer3DModel,
)
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb
from transformers import T5EncoderModel

from batch_runner.upstream import weights_on_device


class FusedAwareLTXAttention(LTXVideoAttnProcessor):
    """LTX's attention processor, reading the fused projection where `fuse_qkv_projections` made one.

    diffusers' `LTXAttention` has no `is_cross_attention`, so fusing gives both its self-attention
    and its cross-attention one `to_qkv` over [to_q; to_k; to_v]. Self-attention applies it once;
    cross-attention applies its query rows to the video and its key/value rows to the text.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if getattr(attn, "to_qkv", None) is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if encoder_hidden_states is None:
            query, key, value = attn.to_qkv(hidden_states).split(
                [attn.inner_dim, attn.inner_kv_dim, attn.inner_kv_dim], dim=-1
            )
        else:
            q = attn.inner_dim
            with weights_on_device(attn.to_qkv):  # sequential CPU offload loads them only around a forward
                weight, bias = attn.to_qkv.weight, attn.to_qkv.bias
                query = torch.nn.functional.linear(hidden_states, weight[:q], None if bias is None else bias[:q])
                key, value = torch.nn.functional.linear(
                    encoder_hidden_states, weight[q:], None if bias is None else bias[q:]
                ).split([attn.inner_kv_dim, attn.inner_kv_dim], dim=-1)

        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class LTXCondition(LTXConditionPipeline):
    """diffusers' pipeline, with the fused-aware attention processor on its transformer.

    Installed when the pipeline is built (from_pretrained, tiny or random), so every path the
    runner takes (any device, compiled or not) runs the same processor.
    """

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLLTXVideo,
        text_encoder: T5EncoderModel,
        tokenizer: Any,
        transformer: LTXVideoTransformer3DModel,
    ) -> None:
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
        if transformer is not None:
            transformer.set_attn_processor(FusedAwareLTXAttention())
