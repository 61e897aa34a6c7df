"""LoRAs fused into the denoiser's weights once, at start, so that every plan runs plain weights.

Each `model.loras` entry is read through diffusers' own LoRA loading (`load_lora_weights`), which
converts the formats people publish (lightx2v's, Kijai's and musubi's Wan LoRAs among them), then
fused (`fuse_lora` at the entry's scale) and its adapter removed (`unload_lora_weights`: the base
layers keep the fused weights). This happens in `build_pipeline`, before fused QKV projections,
memory placement, compilation and host sharing: the loading process shares the fused weights, so
the processes that map its copy fuse nothing themselves (their components are empty then).

One LoRA is loaded, fused and unloaded at a time: diffusers scales every active adapter of a layer
when it fuses one, so fusing several loaded together at different scales would compound them.

A LoRA whose keys name no layer of its denoiser is refused (exit 2) before any row, naming the
first keys; a partly matching one is reported. Names, scales and each file's sha256 go into the
results rows and the output salt (batch_runner.outputs.provenance): a changed LoRA remakes rows.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch_runner.config import LoraConfig, ModelConfig
from batch_runner.errors import UserError
from batch_runner.families import family_of
from batch_runner.families.base import Family

log = logging.getLogger(__name__)

TINY_SCHEME = "tiny://"
# LoRA suffixes of a diffusers key: what precedes them names the layer.
LORA_SUFFIXES = (".lora_A.", ".lora_B.", ".lora_magnitude_vector")
SHOWN_KEYS = 3


@dataclass(frozen=True)
class Lora:
    """One entry resolved: the file diffusers reads, its hash, and the denoiser it goes into."""

    entry: LoraConfig
    file: Path
    sha256: str
    component: str
    load_arguments: dict[str, Any]

    def identity(self) -> dict[str, Any]:
        """What names this LoRA in provenance and the output salt."""
        return {
            "path": self.entry.path,
            "weight_name": self.entry.weight_name,
            "scale": float(self.entry.scale),
            "expert": self.component,
            "sha256": self.sha256,
        }


def resolve(model: ModelConfig, family: Family | None = None) -> list[Lora]:
    """Every `model.loras` entry as a local file with its hash and target (downloads a Hub LoRA)."""
    family = family or family_of(model)
    resolved = []
    for entry in model.loras:
        component, arguments = family.lora_target(model, entry.expert)
        file = lora_file(entry, model, family)
        resolved.append(Lora(entry, file, file_sha256(file), component, arguments))
    return resolved


def identities(model: ModelConfig) -> list[dict[str, Any]]:
    return [lora.identity() for lora in resolve(model)]


def lora_file(entry: LoraConfig, model: ModelConfig, family: Family) -> Path:
    """The safetensors file an entry names: a file, a file in a folder, a file of a Hub repo, or
    `tiny://NAME`, written on demand by the family (the tiny test models' LoRAs, built in code)."""
    path = entry.path
    if path.startswith(TINY_SCHEME):
        return _tiny_file(path.removeprefix(TINY_SCHEME), model, family)
    local = Path(path).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if entry.weight_name:
            file = local / entry.weight_name
            if not file.is_file():
                raise UserError(f"model.loras: {path!r} has no file {entry.weight_name!r}; fix weight_name.")
            return file
        files = sorted(local.glob("*.safetensors"))
        if len(files) != 1:
            raise UserError(
                f"model.loras: folder {path!r} holds {len(files)} .safetensors files; name one with weight_name."
            )
        return files[0]
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise UserError(f"model.loras: {path!r} is neither a file, a folder nor a Hub id (owner/name).")
    return _hub_file(path, entry.weight_name)


def _hub_file(repo: str, weight_name: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    name = weight_name or "pytorch_lora_weights.safetensors"
    try:
        return Path(hf_hub_download(repo, name))
    except Exception as e:  # offline, missing file, gated repo: one sentence either way
        raise UserError(
            f"model.loras: could not get {name!r} of {repo!r} ({type(e).__name__}); download it where there is "
            f"network (`hf download {repo} {name} --local-dir DIR`) and give path=DIR/{name}."
        ) from e


def cache_folder() -> Path:
    """$BATCH_RUNNER_CACHE, default ~/.cache/batch_runner: the tiny LoRAs and the LoRA files' digests."""
    return Path(os.environ.get("BATCH_RUNNER_CACHE", "~/.cache/batch_runner")).expanduser()


def tiny_lora_folder() -> Path:
    return cache_folder() / "tiny-loras"


def _tiny_file(name: str, model: ModelConfig, family: Family) -> Path:
    """The family's tiny LoRA NAME, written once into the cache folder (atomically: processes race)."""
    file = tiny_lora_folder() / f"{family.name}-{name}.safetensors"
    if not file.is_file():
        from safetensors.torch import save_file

        tensors = family.tiny_lora(model, name)
        file.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
        os.close(handle)
        save_file({k: v.contiguous() for k, v in tensors.items()}, temporary)
        os.replace(temporary, file)
    return file


def file_sha256(file: Path) -> str:
    """sha256 of a LoRA file, read once per file version on this host.

    The digest names the file in provenance and the output salt, so every process of every run
    needs it before its first row: a rank-64 LoRA of Wan's 14B blocks is about 0.7 GB in bf16 (40
    blocks of 12 projections), 0.6 s of hashing at the 1.2 GB/s this project's CPU hashes, each
    time. It is kept in the cache folder under the file's identity (path, device, inode, size,
    modification and change times: a rewritten file has another change time, which no tool sets
    back), so later processes read 64 bytes instead.
    """
    info = file.stat()
    identity = f"{file.resolve()}\0{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"
    return _cached_sha256(str(file), identity)


@functools.cache
def _cached_sha256(file: str, identity: str) -> str:
    kept = cache_folder() / "sha256" / hashlib.sha256(identity.encode()).hexdigest()
    with contextlib.suppress(OSError):
        digest = kept.read_text()
        if len(digest) == 64:
            return digest
    sha = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    digest = sha.hexdigest()
    try:  # atomically: processes race; a cache that cannot be written only costs the next one time
        kept.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=kept.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            out.write(digest)
        os.replace(temporary, kept)
    except OSError as e:
        log.debug("LoRA digest not kept in %s: %s", kept.parent, e)
    return digest


# --- checking and fusing ---------------------------------------------------------------------


def layer_of(key: str, prefix: str) -> str | None:
    """The layer a diffusers LoRA key names inside its denoiser, or None if the key is not one of its layers'."""
    if not key.startswith(prefix + "."):
        return None
    body = key[len(prefix) + 1 :]
    for suffix in LORA_SUFFIXES:
        if suffix in body:
            return body.split(suffix)[0]
    return None


def converted_state_dict(loader: Any, lora: Lora) -> dict[str, Any]:
    """The LoRA's tensors under diffusers' names, converted as load_lora_weights converts them
    (`loader`: the pipeline or its class: `lora_state_dict` is a class method)."""
    try:
        return loader.lora_state_dict(str(lora.file))
    except Exception as e:  # the converters assume their format and fail on anything else
        from safetensors import safe_open

        try:
            with safe_open(str(lora.file), "pt") as f:
                keys = "first keys: " + ", ".join(sorted(f.keys())[:SHOWN_KEYS]) + "; "
        except Exception:  # not a safetensors file at all (empty, cut short, another format)
            keys = "not a readable safetensors file; "
        raise UserError(
            f"model.loras: {lora.entry.path!r} is not a LoRA diffusers can read for {lora.component} "
            f"({keys}{type(e).__name__}: {str(e)[:160].strip().rstrip('.')}); point path at a .safetensors LoRA file."
        ) from e


def check_keys(loader: Any, module: Any, lora: Lora, state: dict[str, Any], model_name: str) -> None:
    """Refuse a LoRA none of whose keys names a layer of its denoiser `module`; report one that
    matches in part. `module` may be empty (on the meta device): only its layers' names count."""
    prefix = getattr(loader, "transformer_name", "transformer")
    modules = {name for name, _ in module.named_modules()}
    layers = {key: layer_of(key, prefix) for key in state}
    unmatched = sorted(k for k, layer in layers.items() if layer is None or layer not in modules)
    if len(unmatched) == len(state):
        raise UserError(
            f"model.loras: no key of {lora.entry.path!r} names a layer of the model's {lora.component} "
            f"(first unmatched: {', '.join(unmatched[:SHOWN_KEYS])}); is it a LoRA for {model_name}? "
            "Fix model.loras or the model."
        )
    if unmatched:
        log.warning(
            "LoRA %s: %d of %d keys match no layer of %s and are ignored (first: %s)",
            lora.entry.path,
            len(unmatched),
            len(state),
            lora.component,
            ", ".join(unmatched[:SHOWN_KEYS]),
        )


def check_before_loading(model: ModelConfig, family: Family, skeleton: Callable[[str], Any]) -> None:
    """Check every LoRA's keys against its denoiser built empty from its config (`skeleton(name)`),
    before minutes go into reading the model's weights. Where the skeleton cannot be built, the
    check after loading (apply_loras) still runs, and the loader reports what is missing."""
    loader = family.pipeline_class
    if not model.loras or not hasattr(loader, "lora_state_dict"):
        return
    for lora in resolve(model, family):
        try:
            module = skeleton(lora.component)
        except Exception as e:  # a folder or Hub id the loader will explain better
            log.debug("LoRA keys not checked before loading: %s", e)
            return
        check_keys(loader, module, lora, converted_state_dict(loader, lora), model.name)


def apply_loras(pipe: Any, model: ModelConfig, family: Family, skip: Collection[str] = ()) -> list[Lora]:
    """Fuse every `model.loras` entry into its denoiser, then drop the adapters.

    Components in `skip` are empty here (another process of the host loads them, fused, and this
    one maps that copy): their keys are checked, nothing is fused into them.
    """
    loras = resolve(model, family)
    if loras and not hasattr(pipe, "load_lora_weights"):
        raise UserError(f"model.loras: {model.name}'s pipeline ({type(pipe).__name__}) takes no LoRAs.")
    for number, lora in enumerate(loras):
        state = converted_state_dict(pipe, lora)
        check_keys(pipe, getattr(pipe, lora.component), lora, state, model.name)
        if lora.component in skip:
            continue
        adapter = f"lora_{number}"
        pipe.load_lora_weights(state, adapter_name=adapter, **lora.load_arguments)
        pipe.fuse_lora(components=[lora.component], lora_scale=lora.entry.scale, adapter_names=[adapter])
        pipe.unload_lora_weights()
        log.info("LoRA %s fused into %s at scale %g", lora.entry.path, lora.component, lora.entry.scale)
    return loras
