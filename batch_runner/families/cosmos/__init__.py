"""Cosmos-Predict2.5 image to world (NVIDIA), as diffusers ships it in `Cosmos2_5_PredictBasePipeline`.

One pipeline class, two checkpoints of the same shape: 2B (28 blocks of width 2048) and 14B (36 of
width 5120). The text encoder is Cosmos-Reason1-7B (a Qwen2.5-VL 7B): the prompt, in a chat
template padded to 512 tokens, goes through it and every layer's hidden states, normalised and
concatenated (28 x 3584 values a token), are projected by the transformer to its text width and
cross-attended by every block; text stays out of the self-attention sequence. The VAE is Wan 2.1's
(8x8 pixels and 4 frames a latent: frames 4N+1), the transformer takes 1x2x2 latents a token. The
row's image is the first latent frame, held at a near-zero noise level; there is no last frame.
Its attention goes through diffusers' attention dispatcher, at the process-wide backend: the kernel
is chosen with `sdpa_kernel` inside each processor call, as for CogVideoX. `transformer_blocks` repeat.

The guardrail. NVIDIA's model comes with a safety checker (`cosmos_guardrail`, a separate pip
package that downloads its own models: a blocklist and Qwen3Guard for the prompt, RetinaFace to blur
faces in the video). The pipeline refuses to run without one. `model.options.guardrail=true` (the
full-size configs' default) builds it: each prompt is checked before its video is made (a row whose
prompt it flags fails with its message) and faces in every video are blurred. `false` puts a
pass-through in its place, for runs without that package or its downloads: prompts are not checked
and videos are kept as generated (the README says what that means under NVIDIA's licence).

NVIDIA's own scripts can also rewrite prompts with a prompt upsampler (Cosmos-Reason1); diffusers'
pipeline has none, so prompts are used as written.

One concern per module: family.py (what the runner asks: rows, call, memory terms; no diffusers),
guardrail.py (NVIDIA's checker or the pass-through), pipeline.py (the pipeline subclass, imported
when a pipeline is built).
"""

from __future__ import annotations

from batch_runner.families.cosmos.family import FAMILY, Cosmos
from batch_runner.families.cosmos.guardrail import PassThroughGuardrail

__all__ = ["FAMILY", "Cosmos", "PassThroughGuardrail"]
