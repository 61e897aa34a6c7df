"""Attention without the text's padding: the runner's change to HunyuanVideo-1.5's transformer
(`Family.streamline`), which leaves its output as it is and lets the fused attention kernels run."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

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
            backend=backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)
        video, text = out[:, : -encoder_hidden_states.shape[1]], out[:, -encoder_hidden_states.shape[1] :]
        return attn.to_out[1](attn.to_out[0](video)), attn.to_add_out(text)


def drop_text_padding(transformer: HunyuanVideo15Transformer3DModel) -> None:
    """Give every block `PaddingFreeAttention` and the transformer a hook that cuts each text down to
    its real tokens before the forward (one host sync per forward, to count them).

    The text's length then varies from prompt to prompt: the family names the blocks' text inputs
    (`text_length_inputs`), so compiled blocks make one graph for every length instead of one each.
    """
    processor = PaddingFreeAttention()
    for block in transformer.transformer_blocks:
        block.attn.set_processor(processor)

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
