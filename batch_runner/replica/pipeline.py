"""Building one diffusers pipeline replica from the model config, for any model family.

Three sources of weights, one pipeline class per family (batch_runner.families):
* pretrained: `from_pretrained(model.path)`, a hub id or a local folder, as users run it;
* random: the real architecture from conf/arch/<arch>, random weights created directly on the GPU,
  so that benchmarks need no download (time and memory do not depend on weight values);
* tiny: a few-thousand-parameter pipeline the family builds in code, tokenizer included, for tests
  and the quickstart: deterministic, offline, seconds on a CPU.
"""

from __future__ import annotations

import importlib
import logging
import shlex
from collections.abc import Collection
from typing import Any

import torch

from batch_runner import upstream
from batch_runner.config import ModelConfig
from batch_runner.errors import UserError
from batch_runner.families import family_of
from batch_runner.families.base import (
    Family,
    arch_json,
    default_dtype,
    local_source,
    module_from_config,
    seeded,
)
from batch_runner.replica.lora import apply_loras, check_before_loading

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"model.dtype={name!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def build_pipeline(model: ModelConfig, device: torch.device | str = "cpu", empty: Collection[str] = ()) -> Any:
    """The pipeline with weights where `model.weights` says; on the CPU unless built randomly.

    Components named in `empty` are built on the meta device, without reading or creating any
    weights: another process of the host loads them and this one maps its copy (host_weights).
    The tiny model is always built whole: kilobytes, made in code.
    """
    family = family_of(model)
    dtype = torch_dtype(model.dtype)
    if model.weights == "tiny":
        pipe = family.tiny(model)
        if dtype != torch.float32:
            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module):
                    upstream.cast_as_loaded(component, dtype)
    elif model.weights == "pretrained":
        pipe = load_pretrained(model, family, dtype, empty)
    elif model.weights == "random":
        pipe = random_pipeline(model, dtype, device, empty)
    else:
        raise UserError(f"model.weights={model.weights!r} must be 'pretrained', 'random' or 'tiny'.")
    pipe = family.finish(model, pipe)
    # LoRAs fused before anything else sees the weights (placement, compile, host sharing).
    apply_loras(pipe, model, family, skip=() if model.weights == "tiny" else empty)
    pipe.scheduler = family.make_scheduler(model, pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pretrained(model: ModelConfig, family: Family, dtype: torch.dtype, empty: Collection[str] = ()) -> Any:
    """from_pretrained on a local folder or hub id, failing with one sentence that says what to do."""
    source, looks_local = local_source(model)
    # A LoRA for another model is refused before the weights are read (minutes for a 14B model).
    check_before_loading(model, family, lambda name: empty_component(family, source, name, dtype, model.revision))
    try:
        skeletons = {name: empty_component(family, source, name, dtype, model.revision) for name in empty}
        return family.pipeline_class.from_pretrained(source, dtype=dtype, revision=model.revision, **skeletons)
    except (OSError, ValueError) as e:
        raise load_error(model, source, looks_local, e) from e


def load_error(model: ModelConfig, source: str, looks_local: bool, error: Exception) -> UserError:
    """The one sentence for a model that cannot be read: what is missing and how to get it."""
    cause = f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    revision = f" --revision {shlex.quote(model.revision)}" if model.revision else ""
    if not looks_local:
        return UserError(
            f"Could not load model {model.name!r}: there is no local copy of {source!r} and the Hugging Face "
            f"Hub could not be reached; download it where there is network (`hf download {source}{revision} "
            f"--local-dir DIR`) and run with model.path=DIR. {cause}"
        )
    repo = model.repo or "the model's diffusers repository"
    return UserError(
        f"Could not load model {model.name!r}: model.path={source!r} does not hold a complete diffusers "
        f"pipeline (model_index.json and its component folders); download the whole of {repo} into it "
        f"(`hf download {model.repo or 'REPO'}{revision} --local-dir {shlex.quote(source)}`). {cause}"
    )


def empty_component(
    family: Family, source: str, name: str, dtype: torch.dtype, revision: str | None
) -> torch.nn.Module:
    """A component of a saved pipeline built from its config alone, on the meta device."""
    library, class_name = family.pipeline_class.load_config(source, revision=revision)[name]
    pipelines = importlib.import_module("diffusers.pipelines")
    # A class of a pipeline's own module is saved under that module's name, as diffusers resolves it.
    module = getattr(pipelines, library) if hasattr(pipelines, library) else importlib.import_module(library)
    cls = getattr(module, class_name)
    with torch.device("meta"), default_dtype(dtype):
        if hasattr(cls, "load_config"):  # a diffusers model
            return cls.from_config(cls.load_config(source, subfolder=name, revision=revision))
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source, subfolder=name, revision=revision)
        return cls(config)


def random_pipeline(
    model: ModelConfig, dtype: torch.dtype, device: torch.device | str, empty: Collection[str] = ()
) -> Any:
    """The real architecture with random weights, created directly on `device` in `dtype`."""
    if not model.arch:
        raise UserError(f"model.weights=random needs model.arch (a folder of conf/arch) for {model.name!r}.")
    family = family_of(model)
    modules = {}
    with default_dtype(dtype), seeded(0):
        for name in family.arch_components(model.arch):
            with torch.device("meta" if name in empty else device):
                modules[name] = upstream.cast_as_loaded(module_from_config(arch_json(model.arch, name)), dtype)
    return family.assemble(model, modules, model.arch)
