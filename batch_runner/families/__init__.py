"""Model families: one module each, chosen by the model config's `family` field.

Adding a family is one module or package here (a `Family` subclass, see base.py) and one config file
per checkpoint in conf/model/ (plus conf/arch/<arch>/ for the benchmarks' random-weight build).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from batch_runner.config import ModelConfig
from batch_runner.errors import UserError
from batch_runner.families.base import Family, looks_local

FAMILY_MODULES = ("cogvideox", "wan", "ltx", "hunyuan15", "ltx2", "skyreels", "kandinsky5", "cosmos")
# Model fields that became families' options: a config.yaml saved before holds them at the top of `model`.
FORMER_MODEL_FIELDS = ("timestep_spacing", "use_dynamic_cfg", "boundary_ratio", "expand_timesteps", "guidance_scale_2")


def family_named(name: str) -> Family:
    """The family module `name`, imported on first use (it imports no diffusers until it builds a pipeline)."""
    if name not in FAMILY_MODULES:
        raise UserError(f"model.family={name!r} is not one of {', '.join(FAMILY_MODULES)}.")
    import importlib

    return importlib.import_module(f"batch_runner.families.{name}").FAMILY


def family_of(model: ModelConfig) -> Family:
    return family_named(model.family)


def upgrade_saved_model(model: dict[str, Any]) -> dict[str, Any]:
    """A saved model section as today's schema takes it (from_run of a folder made before options were
    per family): the family's own options move under `options`; the other families' go, as they were
    saved at their defaults and never read. A section saved before `repo` gets it from a `path` that
    names no folder."""
    path = str(model.get("path") or "")
    if "repo" not in model and path and not looks_local(path):
        model["repo"] = path  # saved before models named their repository: a path that was not a folder was it
    former = {key: model.pop(key) for key in FORMER_MODEL_FIELDS if key in model}
    if former and model.get("family") in FAMILY_MODULES:
        keys = {f.name for f in dataclasses.fields(family_named(model["family"]).Options)}
        model["options"] = {**{k: v for k, v in former.items() if k in keys}, **(model.get("options") or {})}
    return model
