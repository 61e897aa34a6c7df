"""Cosmos's timestep modulation once per latent frame, not once per token: the runner's change to
diffusers' `CosmosTransformer3DModel` (`Family.streamline`). Mirrors diffusers 0.42.1.

Why. A Cosmos-Predict2.5 row holds its image's latent frame at a near-zero noise level and every
other frame at the step's, so the pipeline passes one timestep per latent frame. Stock, the
transformer then copies each frame's embedding to every token of the frame (84,480 tokens at
1280x704) and every block's three AdaLN modulations run their two linear layers, the sum with the
time embedding, and the shift, scale and gate on all of those copies: per forward 28 x 3 token-wide
matrix multiplies and about a dozen token x width tensors a block that hold the same 24 rows over
and over. Here each modulation is computed for the 24 frames and broadcast over the frame's tokens
inside the fused elementwise kernels: the same numbers (each token's row is its frame's), less
memory (diffusers' copies are most of Cosmos's activations), less time.

How. Between the blocks the hidden states are held as (batch, frames, tokens of a frame, width), a
view of diffusers' (batch, tokens, width); the modulations are (batch, frames, 1, width), which
diffusers' own `CosmosAdaLayerNormZero` and `CosmosAdaLayerNorm` broadcast unchanged. Attention and
the feed-forward see diffusers' shapes. Only the model's and the block's forward are restated here:
the model's for the timestep embedding (step 4 of diffusers' forward) and the block loop, the
block's for the frame view around its three residual sums. A ControlNet residual or a block with
diffusers' ControlNet projections is not part of the image-to-world pipeline, and is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import CosmosTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers import transformer_cosmos
from diffusers.models.transformers.transformer_cosmos import CosmosTransformerBlock


def per_frame(embedding: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A timestep embedding as (batch, frames, 1, width), which broadcasts over the hidden states'
    (batch, frames, tokens of a frame, width): one row per latent frame (diffusers' per-frame
    timesteps, `B*T` rows), or a single one for the whole clip (a timestep per row, `B` rows)."""
    return embedding.view(batch_size, -1, 1, embedding.shape[-1])


class FrameModulatedBlock(CosmosTransformerBlock):
    """diffusers' block over hidden states viewed as (batch, frames, tokens of a frame, width)."""

    def forward(  # the signature of diffusers' block; the ControlNet arguments must be None
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any,
        embedded_timestep: torch.Tensor,
        temb: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        extra_pos_emb: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        controlnet_residual: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        block_idx: int | None = None,
    ) -> torch.Tensor:
        if controlnet_residual is not None or self.before_proj is not None or self.after_proj is not None:
            raise NotImplementedError("per-frame modulation does not take Cosmos's ControlNet inputs")
        if extra_pos_emb is not None:
            hidden_states = hidden_states + extra_pos_emb.view_as(hidden_states)

        norm_hidden_states, gate = self.norm1(hidden_states, embedded_timestep, temb)
        attn_output = self.attn1(norm_hidden_states.flatten(1, 2), image_rotary_emb=image_rotary_emb)
        hidden_states = hidden_states + gate * attn_output.view_as(hidden_states)

        norm_hidden_states, gate = self.norm2(hidden_states, embedded_timestep, temb)
        attn_output = self.attn2(
            norm_hidden_states.flatten(1, 2), encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask
        )
        hidden_states = hidden_states + gate * attn_output.view_as(hidden_states)

        norm_hidden_states, gate = self.norm3(hidden_states, embedded_timestep, temb)
        return hidden_states + gate * self.ff(norm_hidden_states)


class FrameModulatedCosmos(CosmosTransformer3DModel):
    """diffusers' model, its timestep embedding kept per frame (see the module's docstring)."""

    def forward(  # the signature of diffusers' forward; no ControlNet
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: Any,
        block_controlnet_hidden_states: list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        fps: int | None = None,
        condition_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor] | Transformer2DModelOutput:
        if block_controlnet_hidden_states is not None:
            raise NotImplementedError("per-frame modulation does not take Cosmos's ControlNet inputs")
        batch_size, _, num_frames, height, width = hidden_states.shape

        # 1-3: diffusers' inputs, positions and patches, as they are.
        if condition_mask is not None:
            hidden_states = torch.cat([hidden_states, condition_mask], dim=1)
        if self.config.concat_padding_mask:
            transforms = transformer_cosmos.transforms
            padding_mask_resized = transforms.functional.resize(
                padding_mask, list(hidden_states.shape[-2:]), interpolation=transforms.InterpolationMode.NEAREST
            )
            hidden_states = torch.cat(
                [hidden_states, padding_mask_resized.unsqueeze(2).repeat(batch_size, 1, num_frames, 1, 1)], dim=1
            )
        if attention_mask is not None:
            attention_mask = attention_mask.unsqueeze(1).unsqueeze(1)  # [B, 1, 1, S]
        image_rotary_emb = self.rope(hidden_states, fps=fps)
        extra_pos_emb = self.learnable_pos_embed(hidden_states) if self.config.extra_pos_embed_type else None
        p_t, p_h, p_w = self.config.patch_size
        frames, rows, columns = num_frames // p_t, height // p_h, width // p_w
        hidden_states = self.patch_embed(hidden_states)  # [B, T, H, W, C]

        # 4: the timestep embedding per frame (diffusers copies it to every token).
        if timestep.ndim == 5:
            if timestep.shape != (batch_size, 1, num_frames, 1, 1) or p_t != 1:
                raise ValueError(f"Expected timestep to have shape [B, 1, T, 1, 1], but got {timestep.shape}")
        elif timestep.ndim != 1:
            raise ValueError(f"Expected timestep to have shape [B, 1, T, 1, 1] or [T], but got {timestep.shape}")
        temb, embedded_timestep = self.time_embed(hidden_states, timestep.flatten())
        temb, embedded_timestep = (per_frame(x, batch_size) for x in (temb, embedded_timestep))

        # 5: the text (and image) contexts, as diffusers' forward.
        text_context, img_context = (
            encoder_hidden_states if isinstance(encoder_hidden_states, tuple) else (encoder_hidden_states, None)
        )
        if self.config.use_crossattn_projection:
            text_context = self.crossattn_proj(text_context)
        if img_context is not None and self.config.img_context_dim_in:
            img_context = self.img_context_proj(img_context)
        contexts = (text_context, img_context) if isinstance(encoder_hidden_states, tuple) else text_context

        # 7: the blocks, over (batch, frames, tokens of a frame, width).
        hidden_states = hidden_states.flatten(2, 3)
        for block in self.transformer_blocks:
            hidden_states = block(
                hidden_states, contexts, embedded_timestep, temb, image_rotary_emb, extra_pos_emb, attention_mask
            )

        # 8: output norm, projection and unpatchify, as diffusers' forward.
        hidden_states = self.norm_out(hidden_states, embedded_timestep, temb).flatten(1, 2)
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.unflatten(2, (p_h, p_w, p_t, -1))
        hidden_states = hidden_states.unflatten(1, (frames, rows, columns))
        hidden_states = hidden_states.permute(0, 7, 1, 6, 2, 4, 3, 5)
        hidden_states = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (hidden_states,)
        return Transformer2DModelOutput(sample=hidden_states)


def modulate_per_frame(transformer: torch.nn.Module) -> None:
    """Make diffusers' Cosmos transformer (exactly that class, blocks as diffusers builds them) compute
    its modulations per frame; anything else is left as it is."""
    if type(transformer) is not CosmosTransformer3DModel:
        return
    blocks = transformer.transformer_blocks
    if any(
        type(b) is not CosmosTransformerBlock or b.before_proj is not None or b.after_proj is not None for b in blocks
    ):
        return
    transformer.__class__ = FrameModulatedCosmos
    for block in blocks:
        block.__class__ = FrameModulatedBlock
