"""Cheap checks and scores of a row's frames, from the frames already in memory.

Nothing else in the runner looks at what a row produced. A pipeline whose latents went non-finite (in
fp16, or under an approximation) decodes them to black or constant frames, which would otherwise be
written and recorded `ok` like any other. So a constant video fails its row with a reason, and every
row gets two scores to filter on:

* motion: the mean absolute difference between consecutive frames, on a 0..1 scale (0: a still
  video; a few hundredths: gentle motion; above 0.1: fast motion or cuts);
* brightness: the mean pixel value, on a 0..1 scale (0: black, 1: white).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Quality:
    motion: float | None  # None for a one-frame video
    brightness: float | None
    problem: str | None  # why the row must not count as made, or None


def measure(frames: np.ndarray) -> Quality:
    """Scores and problems of frames (F, H, W, 3): uint8 (0..255) or float (0..1)."""
    scale = 255.0 if frames.dtype == np.uint8 else 1.0
    if frames.dtype != np.uint8 and not np.isfinite(frames).all():
        return Quality(None, None, "the frames hold NaN or infinite values (the latents went non-finite)")
    brightness = round(float(frames.mean(dtype=np.float64)) / scale, 6)
    if len(frames) < 2:
        return Quality(None, brightness, None)
    # One pair at a time: a whole-video difference would double a long video's memory.
    total = 0.0
    for before, after in itertools.pairwise(frames):
        total += float(np.abs(after.astype(np.float32) - before.astype(np.float32)).mean(dtype=np.float64))
    motion = round(total / (len(frames) - 1) / scale, 6)
    if motion == 0.0:
        return Quality(
            0.0,
            brightness,
            f"constant video: all {len(frames)} frames are identical (brightness {brightness:.3f}), "
            "as a model makes them when its latents went non-finite or its guidance collapsed",
        )
    return Quality(motion, brightness, None)
