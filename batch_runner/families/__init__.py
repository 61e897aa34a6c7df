"""Model families: one module each, chosen by the model config's `family` field.

Adding a family is one module here (a `Family` subclass, see base.py) and one config file per
checkpoint in conf/model/ (plus conf/arch/<arch>/ for the benchmarks' random-weight build).
"""

from __future__ import annotations

from batch_runner.config import ModelConfig
from batch_runner.errors import UserError
from batch_runner.families.base import Family

FAMILY_MODULES = ("cogvideox", "wan", "ltx", "hunyuan15")


def family_named(name: str) -> Family:
    """The family module `name`, imported on first use (each pulls in its diffusers classes)."""
    if name not in FAMILY_MODULES:
        raise UserError(f"model.family={name!r} is not one of {', '.join(FAMILY_MODULES)}.")
    import importlib

    return importlib.import_module(f"batch_runner.families.{name}").FAMILY


def family_of(model: ModelConfig) -> Family:
    return family_named(model.family)
