"""The sizes HunyuanVideo-1.5 makes: its resolution's buckets, by the pipeline's own rule.

The pipeline takes no size argument: it picks the bucket (sides multiples of 16, about
target_size^2 pixels) whose aspect ratio is nearest the input image's. A row's size must be a bucket
the pipeline maps to itself; any other is refused with the bucket it would make.

The rule is diffusers' (pipelines/hunyuan_video1_5/image_processor.py of 0.42.1: generate_crop_size_list,
get_closest_ratio and calculate_default_height_width), copied here so that checking a row imports no
diffusers; tests/test_family_hunyuan15.py holds the copy to the pipeline's own answers.
"""

from __future__ import annotations

import functools

import numpy as np

from batch_runner.config import ModelConfig
from batch_runner.families.base import arch_json, local_source

TINY_TARGET = 64  # the tiny model's resolution: sizes near 64x64 pixels (buckets of 16 patches)


@functools.cache
def crop_sizes(target_size: int, spatial: int = 16, max_ratio: float = 4.0) -> tuple[tuple[int, int], ...]:
    """Every (height, width) bucket of about target_size^2 pixels, sides multiples of `spatial`, aspect
    ratio at most `max_ratio`: diffusers' `generate_crop_size_list`, in its order."""
    patches = round((target_size / spatial) ** 2)
    sizes = []
    wp, hp = patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            sizes.append((wp * spatial, hp * spatial))
        if (hp + 1) * wp <= patches:
            hp += 1
        else:
            wp -= 1
    return tuple(sizes)


@functools.cache
def buckets(target_size: int, spatial: int = 16) -> tuple[tuple[int, int], ...]:
    """(height, width) of every size the pipeline makes at this resolution: the buckets it maps to
    themselves (a few of diffusers' buckets round to a neighbour and are never made)."""
    return tuple(b for b in crop_sizes(target_size, spatial) if bucket_for(*b, target_size) == b)


def bucket_for(height: int, width: int, target_size: int, spatial: int = 16) -> tuple[int, int]:
    """The (height, width) the pipeline makes for an image of this size: the bucket of nearest aspect
    ratio on the image's side of square (diffusers' `calculate_default_height_width`)."""
    sizes = crop_sizes(target_size, spatial)
    ratios = np.array([round(float(h) / float(w), 5) for h, w in sizes])
    aspect = float(height) / float(width)
    differences = ratios - aspect
    if aspect >= 1:
        candidates = [(i, d) for i, d in enumerate(differences) if d <= 0]
    else:
        candidates = [(i, d) for i, d in enumerate(differences) if d >= 0]
    return sizes[min(candidates, key=lambda pair: abs(pair[1]))[0]]


def nearest_bucket(height: int, width: int, target_size: int) -> tuple[int, int]:
    """The made size for this aspect ratio: the pipeline's bucket, followed until it maps to itself."""
    size = (height, width)
    for _ in range(len(crop_sizes(target_size))):
        made = bucket_for(*size, target_size)
        if made == size:
            break
        size = made
    return size


def target_size_of(model: ModelConfig) -> int:
    """The checkpoint's resolution (the transformer's `target_size`), read without loading weights
    (from a saved checkpoint through diffusers, which reads the hub's cache as from_pretrained does)."""
    if model.arch:
        return int(arch_json(model.arch, "transformer")["target_size"])
    if model.weights == "pretrained" and model.path:
        from diffusers import HunyuanVideo15Transformer3DModel

        source, _ = local_source(model)
        config = HunyuanVideo15Transformer3DModel.load_config(source, subfolder="transformer", revision=model.revision)
        return int(config.get("target_size", 640))
    return TINY_TARGET
