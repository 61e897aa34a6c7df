"""What made each video: enough to make it again with one command.

The resolved config is saved once as output_dir/config.yaml; every result row carries the model,
scheduler, memory plan, dtype, library versions, GPU and the config's hash. `python run.py
from_run=OUTPUT_DIR ids=[ID] output_dir=NEW` reruns exactly that row's settings, from the
parameters saved with it (batch_runner.run.replay).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from batch_runner.config import RunConfig
from batch_runner.families import family_of, upgrade_saved_model
from batch_runner.outputs.storage import atomic_write_text

CONFIG_FILE = "config.yaml"


def config_yaml(cfg: RunConfig) -> str:
    """The resolved config, whole in itself: from_run (where it came from) is left out, so a replay
    saves and hashes the same config as the run it replays."""
    return OmegaConf.to_yaml(OmegaConf.structured(replace(cfg, from_run=None)))


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(config_yaml(cfg).encode()).hexdigest()[:12]


def run_key(cfg: RunConfig, output_dir: Path) -> str:
    """What makes processes parts of one run: the manifest file (path, size, time), output_dir and config.

    Processes that met at one rendezvous compare it before they make anything (batch_runner.cluster.cluster).
    """
    manifest = Path(os.path.realpath(Path(cfg.manifest).expanduser()))  # no error on a link loop
    try:
        stat = manifest.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        stamp = None
    identity = [str(manifest), stamp, str(output_dir), config_hash(cfg), cfg.from_run]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def output_salt(cfg: RunConfig) -> str:
    """Fingerprint of the settings that change a video beyond its row's own parameters.

    The model's family names its own options that do (`salted_options`)."""
    model = asdict(cfg.model)
    shared = ("name", "weights", "path", "revision", "arch", "dtype", "scheduler", "max_sequence_length")
    decisive = {
        "model": {k: model[k] for k in shared}
        | family_of(cfg.model).salted_options(cfg.model)
        # Settings newer than the first runs count only when set, so those runs still resume.
        | ({"flow_shift": model["flow_shift"]} if model["flow_shift"] else {}),
        "fp8_weights": cfg.memory.fp8_weights,
        "cache": [cfg.speed.cache, cfg.speed.cache_threshold if cfg.speed.cache != "none" else None],
    }
    if not cfg.output.audio:  # a video without the sound its model makes is another video (counted only when off)
        decisive["audio"] = False
    if cfg.model.loras:  # each file's hash too: a LoRA changed in place remakes the rows
        decisive["loras"] = lora_identities(cfg)
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:12]


def load_saved_config(path: Path) -> DictConfig:
    """An output_dir's config.yaml in today's schema (one saved before options were per family is upgraded)."""
    saved = OmegaConf.load(path)
    if isinstance(saved.get("model"), DictConfig):
        saved.model = upgrade_saved_model(OmegaConf.to_container(saved.model))
    return saved


def save_config(cfg: RunConfig, output_dir: Path) -> None:
    # Paths are saved absolute, so that from_run=OUTPUT_DIR works from any folder.
    model_path = Path(cfg.model.path).expanduser()
    if cfg.model.path and (cfg.model.path.startswith((".", "~")) or model_path.exists()):
        cfg = replace(cfg, model=replace(cfg.model, path=str(model_path.resolve())))
    cfg = replace(cfg, manifest=os.path.realpath(Path(cfg.manifest).expanduser()), output_dir=str(output_dir))
    saved = output_dir / CONFIG_FILE
    if cfg.ids is not None and saved.is_file():
        # ids= adds to a folder, it never narrows it: from_run=OUTPUT_DIR still replays every row made.
        earlier = OmegaConf.load(saved).get("ids")
        cfg = replace(cfg, ids=None if earlier is None else [*earlier, *(i for i in cfg.ids if i not in earlier)])
    atomic_write_text(config_yaml(cfg), saved)


def provenance(cfg: RunConfig, replica: Any) -> dict[str, Any]:
    """The per-row provenance columns of this process."""
    device = replica.device
    return {
        "model": cfg.model.name,
        "model_path": cfg.model.path or None,
        # The Hub repository the weights are a copy of, where model.path is a local folder.
        "model_repo": cfg.model.repo or None,
        "model_revision": cfg.model.revision,
        "scheduler": type(replica.pipe.scheduler).__name__,
        "dtype": cfg.model.dtype,
        "torch_version": torch.__version__,
        "diffusers_version": _version("diffusers"),
        "transformers_version": _version("transformers"),
        "batch_runner_version": _version("batch_runner"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpus_per_replica": cfg.replica.gpus,
        # Decoding in smaller tiles moves the seams between them: the pixels differ a little.
        "vae_tile": replica.placement.vae_tile,
        # The LoRAs fused into the weights: path, weight_name, scale, expert and sha256 of each file.
        "loras": json.dumps(lora_identities(cfg)) if cfg.model.loras else None,
    }


def lora_identities(cfg: RunConfig) -> list[dict[str, Any]]:
    from batch_runner.replica.lora import identities

    return identities(cfg.model)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
