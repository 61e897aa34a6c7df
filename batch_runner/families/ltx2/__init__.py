"""LTX-2 image-to-video with sound (Lightricks, 19B), as diffusers ships it in `LTX2ImageToVideoPipeline`.

One concern per module: family.py (what the runner asks: rows, the call, the sound, memory terms;
no diffusers at import), guidance.py (the transformer that runs a step's guidance passes in one
forward, imported when `streamline` changes a built model).
"""

from __future__ import annotations

from batch_runner.families.ltx2.family import FAMILY, LTX2, HostPrompt, LTX2Options

__all__ = ["FAMILY", "LTX2", "HostPrompt", "LTX2Options"]
