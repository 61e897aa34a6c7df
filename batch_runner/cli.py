"""From Hydra's composed config to a finished run, with errors as sentences."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from batch_runner import devices, lifecycle
from batch_runner.config import RunConfig
from batch_runner.errors import UserError
from batch_runner.provenance import CONFIG_FILE
from batch_runner.storage import OutputError

log = logging.getLogger("batch_runner")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The typed config; with from_run=DIR, DIR's saved config plus this command's overrides."""
    try:
        if cfg.get("from_run"):
            cfg = _from_run(Path(cfg.from_run).expanduser(), _overrides())
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
    base = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(saved))
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
    merged.from_run = None
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


def setup_logging(level: str, rank: int, world: int) -> None:
    """Log to the terminal; the main process owns it, so the others write only warnings and errors.

    Lines from other processes would break the main process's progress bar (tqdm redraws its line
    in place, and only knows of its own process's log lines); what they log below warnings goes to
    their own file in output_dir (log_to_file) once the run has one.
    """
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    if rank != 0:
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
    for noisy in ("diffusers", "transformers", "accelerate", "torch._dynamo", "torch._inductor"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
    except ImportError:
        pass


def log_to_file(path: Path) -> None:
    """Also log everything this process logs (at the run's level) to `path`: a non-main rank's full log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(root.handlers[0].formatter if root.handlers else None)
    root.addHandler(handler)


def main(cfg: DictConfig) -> int:
    import os

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    lifeline = lifecycle.install()
    try:
        run_config = to_run_config(cfg)
        # Before setting up logging, which imports diffusers and transformers: they may start CUDA.
        gpu = devices.see_own_gpu_only() if run_config.replica.gpus == 1 else None
        setup_logging(str(cfg.get("log_level", "INFO")), rank, world)
        if gpu is not None:
            log.info("this process sees only GPU %s, as cuda:0", gpu)
        from batch_runner.runner import output_dir_of, run

        lifeline.output_dir = output_dir_of(run_config)
        return run(run_config)
    except UserError as e:
        # Any process may find the output folder full first; other problems are the same on all.
        if rank == 0 or isinstance(e, OutputError):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except lifecycle.Interrupted as e:
        if rank == 0:
            print(f"{e.why}: finished rows are kept; rerun the same command to make the rest.", file=sys.stderr)
        return e.exit_code
    finally:
        lifecycle.uninstall()
