"""Cosmos-Predict2.5's safety checker: NVIDIA's guardrail, or a pass-through where the config turns it off
(the package's docstring says what each does)."""

from __future__ import annotations

from typing import Any

import numpy as np

from batch_runner.errors import UserError


class PassThroughGuardrail:
    """Stands where the pipeline wants its safety checker when the guardrail is off: every prompt
    passes and every video is kept as generated. Holds no weights; not saved with the pipeline."""

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
        return frames

    def to(self, *args: Any, **kwargs: Any) -> PassThroughGuardrail:
        return self


def nvidia_guardrail() -> Any:
    """NVIDIA's safety checker; a UserError saying how to get it, or turn it off, where it is missing."""
    try:
        from cosmos_guardrail import CosmosSafetyChecker
    except ImportError as e:
        raise UserError(
            "model.options.guardrail=true needs NVIDIA's Cosmos guardrail: `pip install cosmos_guardrail` (it "
            "downloads nvidia/Cosmos-1.0-Guardrail and Qwen/Qwen3Guard-Gen-0.6B on first use); or set "
            "model.options.guardrail=false to run without it (README, Cosmos-Predict2.5)."
        ) from e
    return CosmosSafetyChecker()
