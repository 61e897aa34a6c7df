"""LTX-Video image-to-video (Lightricks), through diffusers' `LTXConditionPipeline`.

One pipeline class serves every configured checkpoint (2B 0.9.5, 13B 0.9.7): diffusers wrote
`LTXConditionPipeline` for 0.9.5 and saves the 13B as one, and its maintainers answer 0.9.5's poor
videos through `LTXPipeline`/`LTXImageToVideoPipeline` with "use LTXConditionPipeline"
(huggingface/diffusers#11143, #11147). It does what these checkpoints were trained with and the
image-to-video pipeline (written for 0.9.0/0.9.1) does not: causal temporal positions (latent frame
k sits at pixel frame 8k-7, not 8k), the linear-quadratic sigma schedule, and timestep-dependent
noise on the conditioning frame. The first frame is `LTXVideoCondition(image=..., frame_index=0)`.

The VAE compresses 32x32 pixels and 8 frames into one latent (frames 8N+1, sides multiples of
32) and the transformer takes each latent as one token (patch 1x1x1). Text reaches the video by
cross-attention only. The pipeline batches the conditional and unconditional passes (batch 2 under
guidance) and needs each prompt's attention mask beside its embedding, so the cached embedding of a
text is the pair (embedding, mask).

Its attention processor calls diffusers' attention dispatcher, so the base class's
`set_attention_backend` chooses the kernel. The stock processor reads `to_q`, `to_k` and `to_v`
even after `fuse_qkv_projections`, which the runner drops once fused (speed.fuse_qkv): the
pipeline class here installs a processor that reads the fused projection when there is one.

diffusers documents the 13B with a second pass through a latent upsampler (multi-scale rendering);
this family makes the single pass at the row's size and does not configure the upsampler.

family.py is what the runner asks (rows, call, memory terms) and imports no diffusers; pipeline.py
holds the pipeline subclass and its attention processor, imported when a pipeline is built.
"""

from __future__ import annotations

from batch_runner.families.ltx.family import FAMILY, LTX

__all__ = ["FAMILY", "LTX"]
