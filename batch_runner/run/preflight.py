"""What a multi-process launch refuses before it starts its processes.

`accelerate launch --cpu --num_processes N run.py ...` starts this script once, which then starts
the N processes under torchrun (batch_runner.run.launch). A bad setting or a bad manifest row found
by those processes was reported by rank 0, then repeated by torchrun's failure lines and
tracebacks. The launching process checks the same things first (the settings, a local model.path,
the manifest's rows, the output folder, from_run's saved rows), prints the one sentence once and
exits 2 with no process started. The processes still check everything themselves: this is an early
copy of their first checks, not a replacement, so anything it cannot compose is left to them.
"""

from __future__ import annotations

import os
from pathlib import Path

from batch_runner.errors import UserError


def preflight(args: list[str], conf_dir: Path, world_size: int) -> None:
    """Raise UserError for what the launch's `world_size` processes would refuse before loading a model."""
    from hydra import compose, initialize_config_dir

    from batch_runner.families.base import local_source
    from batch_runner.inputs.manifest import load_manifest
    from batch_runner.outputs.storage import OutputLock, check_output_dir
    from batch_runner.run.checks import check_settings
    from batch_runner.run.cli import to_run_config
    from batch_runner.run.replay import replayed
    from batch_runner.run.runner import output_dir_of

    overrides = [arg for arg in args if not arg.startswith("-")]
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            composed = compose("config", overrides=overrides)
    except Exception:
        return  # Hydra's options or grammar this check does not follow: the processes say what is wrong
    cfg = to_run_config(composed, overrides)
    before = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)  # as the processes will see it (replica.gpus must divide it)
    try:
        check_settings(cfg)
    finally:
        if before is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = before
    if cfg.model.weights == "pretrained":
        local_source(cfg.model)  # a model.path that is a file, or no folder at all
    manifest = load_manifest(cfg.manifest, cfg.model, cfg.seed, cfg.ids, cfg.output.format)
    if manifest.problems and cfg.on_invalid != "skip":
        raise UserError(manifest.refusal())
    out = output_dir_of(cfg)
    check_output_dir(out, manifest.path)
    OutputLock(out).refuse_if_held()
    if cfg.from_run:
        replayed(cfg, manifest)
