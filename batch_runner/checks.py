"""Every setting that can be checked without the manifest or the model, checked in one place.

cli.main calls check_settings before the manifest is read, the process group is joined or any
model loads, so a misspelt choice or an impossible number ends the run at once with one line
naming the setting, the valid values and the fix, instead of failing after the model loaded or,
worse, after every video was made (a zero step count failed every row; a zero fps made 24 fps
videos that the results called 0 fps).
"""

from __future__ import annotations

import math
from typing import Any

from batch_runner.config import RunConfig
from batch_runner.errors import UserError
from batch_runner.families import FAMILY_MODULES, family_named
from batch_runner.memory import PLANS
from batch_runner.pipeline import DTYPES
from batch_runner.speed import ATTENTION_BACKENDS

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Setting -> its valid values. The plans, dtypes and attention backends come from the modules that
# implement them; the others are the branches of the code that reads them.
CHOICES: dict[str, tuple[str, ...]] = {
    "output.format": ("videofolder", "webdataset"),
    "scheduling": ("dynamic", "static"),
    "on_invalid": ("fail", "skip"),
    "memory.plan": ("auto", *PLANS),
    "model.dtype": tuple(DTYPES),
    "model.weights": ("pretrained", "random", "tiny"),
    "speed.compile": ("auto", "on", "off"),
    "speed.attention": ("auto", *ATTENTION_BACKENDS),
    "speed.cache": ("none", "first_block", "pyramid"),
}
# Setting -> (lowest, highest, whole number?); None means no bound. The row defaults use the same
# ranges as the manifest's per-row columns (batch_runner.manifest).
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "model.num_frames": (1, 10_000, True),
    "model.num_inference_steps": (1, 1000, True),
    "model.height": (8, 8192, True),
    "model.width": (8, 8192, True),
    "model.fps": (0.1, 240.0, False),
    "model.guidance_scale": (0.0, 100.0, False),
    "model.max_sequence_length": (1, None, True),
    "memory.budget_gib": (0.01, None, False),
    "memory.host_budget_gib": (0.01, None, False),
    "speed.cache_threshold": (0.0, None, False),
    "speed.prefetch": (0, None, True),
    "output.shard_size": (1, None, True),
    "output.crf": (0, 51, True),
    "chunk_size": (1, None, True),
    "max_image_pixels": (1, None, True),
}


def check_settings(cfg: RunConfig) -> None:
    """Raise one UserError, one line, naming every bad setting and what to write instead."""
    problems = [p for key in CHOICES if (p := _choice_problem(key, _get(cfg, key)))]
    problems += [p for key in RANGES if (p := _range_problem(key, _get(cfg, key)))]
    problems += _model_problems(cfg)
    if str(cfg.log_level).upper() not in LOG_LEVELS:
        problems.append(f"log_level={cfg.log_level!r} is not one of {', '.join(LOG_LEVELS)} (e.g. log_level=INFO)")
    if problems:
        raise UserError("; ".join(problems) + "; nothing was loaded or written.")


def _model_problems(cfg: RunConfig) -> list[str]:
    """The settings whose valid values the model's family decides (its schedulers)."""
    if cfg.model.family not in FAMILY_MODULES:
        return [f"model.family={cfg.model.family!r} is not one of {', '.join(FAMILY_MODULES)}"]
    schedulers = (*family_named(cfg.model.family).schedulers, "default")
    if cfg.model.scheduler in schedulers:
        return []
    return [f"model.scheduler={cfg.model.scheduler!r} is not one of {', '.join(schedulers)} for {cfg.model.name}"]


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _choice_problem(key: str, value: Any) -> str | None:
    valid = CHOICES[key]
    if value in valid:
        return None
    return f"{key}={value!r} is not one of {', '.join(valid)} (e.g. {key}={valid[0]})"


def _range_problem(key: str, value: Any) -> str | None:
    if value is None:
        return None
    lo, hi, whole = RANGES[key]
    kind = "an integer" if whole else "a number"
    span = f"from {lo:g} to {hi:g}" if hi is not None else f"of at least {lo:g}"
    number = float(value)
    inside = math.isfinite(number) and (lo is None or number >= lo) and (hi is None or number <= hi)
    if inside and (not whole or number.is_integer()):
        return None
    return f"{key}={value!r} is out of range; use {kind} {span}"
