"""What a model can make, and the nearest thing it can make when asked for something else.

A row that breaks a rule is refused with the nearest valid value: passing it on would raise deep in
the pipeline (CogVideoX-5B-I2V's learned positional embeddings exist for 720x480 only) or, worse,
silently make something else (13 frames decode to 16).
"""

from __future__ import annotations

from batch_runner.config import ModelConfig


def valid_frame_counts(model: ModelConfig) -> list[int]:
    """Every frame count the model makes exactly: frame_multiple * N + 1, N >= 1, up to max_frames."""
    step = model.frame_multiple
    return list(range(step + 1, model.max_frames + 1, step))


def frame_problem(model: ModelConfig, frames: int) -> str | None:
    """None if `frames` is makeable, else why not and the nearest valid count."""
    valid = valid_frame_counts(model)
    if frames in valid:
        return None
    nearest = _nearest(valid, frames)
    rule = f"{model.frame_multiple}N+1 frames, {valid[0]} to {valid[-1]}"
    return f"{model.name} makes {rule}, not {frames}; the nearest valid value is {nearest}"


def size_problem(model: ModelConfig, height: int, width: int) -> str | None:
    """None if the model makes height x width, else why not and the nearest valid size."""
    if model.sizes:
        allowed = [(int(h), int(w)) for h, w in model.sizes]
        if (height, width) in allowed:
            return None
        names = " or ".join(f"{w}x{h}" for h, w in allowed)
        best_h, best_w = min(allowed, key=lambda s: abs(s[0] - height) + abs(s[1] - width))
        return (
            f"{model.name} makes only {names} (width x height), not {width}x{height}; "
            f"use width={best_w} height={best_h}"
        )
    near_h, near_w = nearest_size(model, height, width)
    if (near_h, near_w) == (height, width):
        return None
    return (
        f"{model.name} cannot make {width}x{height} (width x height): {_size_rule_text(model)}; "
        f"the nearest valid size is width={near_w} height={near_h}"
    )


def nearest_size(model: ModelConfig, height: int, width: int) -> tuple[int, int]:
    """The makeable (height, width) closest to the one asked for, under the size rules."""
    m = model.size_multiple
    h, w = _round_to(height, m), _round_to(width, m)
    lo = max(model.min_side, m)
    h, w = max(h, lo), max(w, lo)
    if model.short_side is not None:
        if h <= w:
            h = model.short_side
            w = max(w, model.short_side)
        else:
            w = model.short_side
            h = max(h, model.short_side)
    if model.max_long_side is not None:
        cap = model.max_long_side - model.max_long_side % m
        h, w = min(h, cap), min(w, cap)
    return h, w


def _size_rule_text(model: ModelConfig) -> str:
    parts = [f"both sides multiples of {model.size_multiple}, at least {max(model.min_side, model.size_multiple)}"]
    if model.short_side is not None:
        parts.append(f"the short side exactly {model.short_side}")
    if model.max_long_side is not None:
        parts.append(f"the long side at most {model.max_long_side}")
    return ", ".join(parts)


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def _nearest(values: list[int], target: int) -> int:
    # Ties go to the larger value: a video a little longer than asked beats one cut short.
    return min(values, key=lambda v: (abs(v - target), -v))
