"""HunyuanVideo-1.5 image-to-video (Tencent), as diffusers ships it in `HunyuanVideo15ImageToVideoPipeline`.

Three encoders feed one 8.3B dual-stream transformer: a Qwen2.5-VL 7B language model (its hidden
states two layers from the top, 1000 tokens after the chat template's 108), a ByT5 glyph encoder
(256 tokens, run only on text quoted in the prompt) and a SigLIP image encoder (729 tokens). All
three join the video tokens in self-attention: diffusers pads them to 1985 tokens and masks the
padding; the runner's path drops it instead (`drop_text_padding`), so attention needs no mask.
The VAE compresses 16x16 pixels and 4 frames (frames 4N+1), one token per latent.

The size is not an argument of the pipeline: it takes the input image's aspect ratio and picks the
bucket of its resolution (`target_size`, 640 for 480p, 960 for 720p: sides multiples of 16 with
about target_size^2 pixels) whose ratio is nearest. The runner crops each input image to the row's
height x width first, so a row's height/width must be one of those buckets (a size the pipeline
maps to itself); any other size is refused with the bucket the pipeline would make for its ratio.
Thus the row's height and width are the video's real size, in results.parquet as everywhere else.

Guidance is a component (`guider`, diffusers' ClassifierFreeGuidance), not a call argument: the
pipeline class here takes `guidance_scale` per call and swaps in a guider with that scale. The
conditional and unconditional passes are separate forwards of batch 1.

One concern per module: family.py (what the runner asks: rows, call, memory terms), pipeline.py (the
pipeline subclass), attention.py (attention without the text's padding), buckets.py (the sizes it
makes) and tiny.py (the toy-scale build and its tokenizers). Imported on first use, as every family;
family.py and buckets.py import no diffusers, the others are imported when a pipeline is built.
"""

from __future__ import annotations

from batch_runner.families.hunyuan15.family import FAMILY, HunyuanVideo15

__all__ = ["FAMILY", "HunyuanVideo15"]
