"""From Hydra's composed config to a finished run, with errors as sentences."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from batch_runner.cluster import devices
from batch_runner.config import RunConfig
from batch_runner.errors import UserError
from batch_runner.outputs.provenance import CONFIG_FILE, load_saved_config
from batch_runner.run import lifecycle
from batch_runner.run.logs import setup_logging

log = logging.getLogger("batch_runner")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def to_run_config(cfg: DictConfig, overrides: list[str] | None = None) -> RunConfig:
    """The typed config; with from_run=DIR, DIR's saved config plus this command's overrides
    (`overrides`, or those Hydra's app was given)."""
    try:
        if cfg.get("from_run"):
            cfg = _from_run(Path(cfg.from_run).expanduser(), _overrides() if overrides is None else overrides)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "a setting"
        if "Missing mandatory value" in str(e):
            raise UserError(f"{key} is required: python run.py {key}=... (see the README).") from e
        raise UserError(f"Bad setting {key}: {str(e).splitlines()[0]}") from e


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _from_run(folder: Path, overrides: list[str]) -> DictConfig:
    saved = folder / CONFIG_FILE
    if not saved.is_file():
        raise UserError(f"from_run={str(folder)!r} holds no {CONFIG_FILE}; point it at an earlier run's output_dir.")
    try:
        base = OmegaConf.merge(OmegaConf.structured(RunConfig), load_saved_config(saved))
        OmegaConf.to_object(base)  # a mandatory value missing (an emptied file) shows here, not later
    except Exception as e:  # YAML that does not parse, or not a run's settings (edited by hand)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"from_run={str(folder)!r}: its {CONFIG_FILE} is not a run's saved settings ({first}); "
            f"restore it, or run with manifest= and the settings instead of from_run."
        ) from e
    mine = [o.lstrip("+") for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith("from_run")]
    # A group choice (model=..., memory=...) replaces that whole group with its YAML, composed by
    # Hydra as a fresh run composes it; plain keys (model.path=...) then apply on top, as they do there.
    choices = [o for o in mine if "=" in o and isinstance(base.get(o.split("=", 1)[0]), DictConfig)]
    if choices:
        composed = _compose(choices)
        for group in (choice.split("=", 1)[0] for choice in choices):
            base[group] = composed[group]
    plain = [o for o in mine if o not in choices]
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(plain))
    merged.from_run = str(folder.resolve())  # the run reads its rows' saved parameters there (run/replay.py)
    return merged


def _compose(choices: list[str]) -> DictConfig:
    """conf/config.yaml composed with these group choices (inside run.py's Hydra app, or from conf/)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        if GlobalHydra.instance().is_initialized():
            return compose(config_name="config", overrides=choices)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(config_name="config", overrides=choices)
    except HydraException as e:
        raise UserError(f"{' '.join(choices)} with from_run: {str(e).splitlines()[0]}") from e


def main(cfg: DictConfig) -> int:
    import os

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    lifeline = lifecycle.install()
    try:
        run_config = to_run_config(cfg)
        # Before anything asks torch about CUDA (the runner does, and diffusers when imported): that starts it.
        gpu = devices.see_own_gpu_only() if run_config.replica.gpus == 1 else None
        setup_logging(str(cfg.get("log_level", "INFO")), rank, world)
        if gpu is not None:
            log.info("this process sees only GPU %s, as cuda:0", gpu)
        from batch_runner.run.runner import output_dir_of, run

        lifeline.output_dir = output_dir_of(run_config)
        return run(run_config)
    except UserError as e:
        # Any process may find the output folder full first, or its host's launch at odds with
        # another's (e.every_rank); other problems are the same on all.
        if rank == 0 or e.every_rank:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except lifecycle.Interrupted as e:
        if rank == 0:
            # The terminal may be gone with the launcher (accelerate relays our stderr through a pipe).
            with contextlib.suppress(OSError):
                print(f"{e.why}: finished rows are kept; rerun the same command to make the rest.", file=sys.stderr)
        else:  # below warnings: to this process's own log file only, which outlives a killed launcher
            log.info("%s: finished rows are kept", e.why)
        return e.exit_code
    finally:
        lifecycle.uninstall()
