"""Every setting that can be checked without the manifest or the model, checked in one place.

cli.main calls check_settings before the manifest is read, the process group is joined or any
model loads, so a misspelt choice or an impossible number ends the run at once with one line
naming the setting, the valid values and the fix, instead of failing after the model loaded or,
worse, after every video was made (a zero step count failed every row; a zero fps made 24 fps
videos that the results called 0 fps).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from batch_runner.cluster.parallel import ATTENTIONS
from batch_runner.config import RunConfig
from batch_runner.errors import UserError
from batch_runner.families import FAMILY_MODULES, family_named
from batch_runner.inputs.validation import ROW_RANGES
from batch_runner.replica.pipeline import DTYPES
from batch_runner.replica.planner import PLANS
from batch_runner.replica.speed import ATTENTION_BACKENDS

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
    "replica.attention": ATTENTIONS,
}
# Setting -> (lowest, highest, whole number?); None means no bound. The row defaults take the ranges
# of the manifest's per-row columns from their one table (batch_runner.inputs.validation).
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    **{
        f"model.{column}": ROW_RANGES[column]
        for column in ("num_frames", "num_inference_steps", "height", "width", "fps", "guidance_scale")
    },
    "model.max_sequence_length": (1, None, True),
    "memory.budget_gib": (0.01, None, False),
    "memory.host_budget_gib": (0.01, None, False),
    "memory.vae_tile": (64, None, True),
    "speed.cache_threshold": (0.0, None, False),
    "speed.prefetch": (0, None, True),
    "output.shard_size": (1, None, True),
    "output.crf": (0, 51, True),
    "chunk_size": (1, None, True),
    "claim_timeout": (1, None, False),
    "max_image_pixels": (1, None, True),
    "replica.gpus": (1, None, True),
}


def check_settings(cfg: RunConfig) -> None:
    """Raise one UserError, one line, naming every bad setting and what to write instead."""
    problems = [p for key in CHOICES if (p := _choice_problem(key, _get(cfg, key)))]
    problems += [p for key in RANGES if (p := _range_problem(key, _get(cfg, key)))]
    problems += _model_problems(cfg)
    if not problems:
        problems += _default_row_problems(cfg)
    problems += _replica_problems(cfg)
    if cfg.ids is not None and not list(cfg.ids):
        problems.append("ids=[] selects no row; name the rows to make (ids=[a,b]), or leave ids out to make every row")
    fixes = {"manifest": "give the path of a .csv or .parquet file", "output_dir": "give a folder, or leave it out"}
    for key, fix in fixes.items():
        if isinstance(value := getattr(cfg, key), str) and not value.strip():
            problems.append(f"{key}= is empty (an unset shell variable?); {fix}")
    if str(cfg.log_level).upper() not in LOG_LEVELS:
        problems.append(f"log_level={cfg.log_level!r} is not one of {', '.join(LOG_LEVELS)} (e.g. log_level=INFO)")
    if problems:
        raise UserError("; ".join(problems) + "; nothing was loaded or written.")


def _model_problems(cfg: RunConfig) -> list[str]:
    """The settings whose valid values the model's family decides (its schedulers and its options)."""
    if cfg.model.family not in FAMILY_MODULES:
        return [f"model.family={cfg.model.family!r} is not one of {', '.join(FAMILY_MODULES)}"]
    family = family_named(cfg.model.family)
    problems = family.option_problems(cfg.model)
    schedulers = (*family.schedulers, "default")
    if cfg.model.scheduler not in schedulers:
        problems.append(
            f"model.scheduler={cfg.model.scheduler!r} is not one of {', '.join(schedulers)} for {cfg.model.name}"
        )
    if cfg.model.weights == "tiny" and cfg.model.path:
        problems.append(
            f"model.path={cfg.model.path!r} is not read by {cfg.model.name}, whose weights are built in code; "
            "drop model.path, or add model.weights=pretrained to load the pipeline it holds"
        )
    for number, entry in enumerate(cfg.model.loras, 1):
        if not math.isfinite(entry.scale):
            problems.append(f"model.loras entry {number} ({entry.path!r}) has scale={entry.scale}; give a finite scale")
    tile = cfg.memory.vae_tile
    if isinstance(tile, int) and not family.activations.tile_side:
        problems.append(f"memory.vae_tile={tile} is not a setting of {cfg.model.name}'s VAE; leave it unset (null)")
    elif isinstance(tile, int) and tile % 64:
        # A tile overlaps the next by a quarter, in whole latent pixels (16 pixels each) on both sides.
        problems.append(f"memory.vae_tile={tile} is not a multiple of 64 pixels (e.g. memory.vae_tile=128)")
    return problems


def _default_row_problems(cfg: RunConfig) -> list[str]:
    """The model's row rules broken by the row settings themselves (model.num_frames=10 for a model of
    8N+1 frames): named as settings here, not as the fault of every manifest row that takes them."""
    model = cfg.model
    family = family_named(model.family)
    broken = family.row_problems(model, model.num_frames, model.height, model.width, model.num_inference_steps)
    return [
        f"{'model.height/model.width' if column == 'height/width' else f'model.{column}'}: {reason} "
        "(the default of each row that gives none)"
        for column, reason in broken
    ]


# diffusers' context-parallel attention runs only on its dispatcher backends that support it (its
# _AttentionBackendRegistry): speed.attention's efficient and math kernels are not among them.
# fa4 is accepted: a split replica runs it on cuDNN (batch_runner/replica/fa4.py says why).
CONTEXT_PARALLEL_ATTENTION = ("auto", "cudnn", "flash", "fa4")


def _replica_problems(cfg: RunConfig) -> list[str]:
    """What replica.gpus > 1 needs: a world it divides, a family diffusers can split, and settings
    that every process of a replica runs alike (a step cache decides per process, on its part of
    the sequence, and the processes would part ways)."""
    gpus = cfg.replica.gpus
    if not isinstance(gpus, int) or gpus <= 1:
        return []
    problems = []
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % gpus:
        problems.append(
            f"replica.gpus={gpus} does not divide the {world} process(es) started; launch a multiple of {gpus} "
            f"(accelerate launch --num_processes {max(gpus, world - world % gpus)}) or set replica.gpus=1"
        )
    if cfg.model.family in FAMILY_MODULES and not family_named(cfg.model.family).context_parallel:
        problems.append(
            f"replica.gpus={gpus} needs a model whose transformer diffusers can split across GPUs (context "
            f"parallelism), and {cfg.model.name} ({cfg.model.family}) has none; set replica.gpus=1 to run one "
            "replica per GPU"
        )
    if cfg.speed.attention not in CONTEXT_PARALLEL_ATTENTION:
        problems.append(
            f"speed.attention={cfg.speed.attention!r} cannot be split across replica.gpus={gpus}; use one of "
            f"{', '.join(CONTEXT_PARALLEL_ATTENTION)}"
        )
    if cfg.speed.cache != "none":
        problems.append(f"speed.cache={cfg.speed.cache!r} does not work with replica.gpus={gpus}; use speed.cache=none")
    if cfg.replica.attention == "ring" and not torch.cuda.is_available():
        problems.append(
            "replica.attention=ring needs a GPU attention kernel that returns its log-sum-exp (cuDNN or flash); "
            "use replica.attention=ulysses without a GPU"
        )
    return problems


def check_replica_rows(cfg: RunConfig, jobs: list[Any]) -> None:
    """Refuse rows whose token sequence replica.gpus does not divide: diffusers splits it in equal parts.

    Called once the manifest is read, before any model loads.
    """
    gpus = cfg.replica.gpus
    if gpus <= 1 or not jobs:
        return
    from batch_runner.replica.anatomy import anatomy

    geometry = anatomy(cfg.model).geometry
    bad = [
        (job, tokens)
        for job in jobs
        if (tokens := geometry.tokens(job.num_frames, job.height, job.width, cfg.model.max_sequence_length)) % gpus
    ]
    if not bad:
        return
    job, tokens = bad[0]
    others = f" (and {len(bad) - 1} other row(s))" if len(bad) > 1 else ""
    raise UserError(
        f"Row id {job.id!r}{others}: {job.num_frames} frames at {job.width}x{job.height} make {tokens} tokens, which "
        f"replica.gpus={gpus} cannot split in equal parts; choose a size or frame count whose token count "
        f"{gpus} divides, or set replica.gpus=1."
    )


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
