"""The sizes HunyuanVideo-1.5 makes: its resolution's buckets, by the pipeline's own rule.

The pipeline takes no size argument: it picks the bucket (sides multiples of 16, about
target_size^2 pixels) whose aspect ratio is nearest the input image's. A row's size must be a bucket
the pipeline maps to itself; any other is refused with the bucket it would make.
"""

from __future__ import annotations

import functools

from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.pipelines.hunyuan_video1_5.image_processor import generate_crop_size_list

from batch_runner.config import ModelConfig
from batch_runner.families.base import arch_json, local_source

TINY_TARGET = 64  # the tiny model's resolution: sizes near 64x64 pixels (buckets of 16 patches)


@functools.cache
def buckets(target_size: int, spatial: int = 16) -> tuple[tuple[int, int], ...]:
    """(height, width) of every size the pipeline makes at this resolution: the buckets it maps to
    themselves (a few of diffusers' buckets round to a neighbour and are never made)."""
    return tuple(b for b in generate_crop_size_list(target_size, spatial) if bucket_for(*b, target_size) == b)


def bucket_for(height: int, width: int, target_size: int, spatial: int = 16) -> tuple[int, int]:
    """The (height, width) the pipeline makes for an image of this size (its own rule, unchanged)."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=spatial)
    return tuple(processor.calculate_default_height_width(height, width, target_size))


def nearest_bucket(height: int, width: int, target_size: int) -> tuple[int, int]:
    """The made size for this aspect ratio: the pipeline's bucket, followed until it maps to itself."""
    size = (height, width)
    for _ in range(len(generate_crop_size_list(target_size, 16))):
        made = bucket_for(*size, target_size)
        if made == size:
            break
        size = made
    return size


def target_size_of(model: ModelConfig) -> int:
    """The checkpoint's resolution (the transformer's `target_size`), read without loading weights."""
    if model.arch:
        return int(arch_json(model.arch, "transformer")["target_size"])
    if model.weights == "pretrained" and model.path:
        source, _ = local_source(model)
        config = HunyuanVideo15Transformer3DModel.load_config(source, subfolder="transformer", revision=model.revision)
        return int(config.get("target_size", 640))
    return TINY_TARGET
