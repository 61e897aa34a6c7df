"""What a model is made of, without its weights: components, sizes and block structure.

Built on the meta device (from conf/arch/<arch>, a saved pipeline's configs, or the tiny pipeline),
so dry runs and the planner know what each plan costs before anything is read from disk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from batch_runner import upstream
from batch_runner.config import ModelConfig
from batch_runner.families import family_named, family_of
from batch_runner.families.base import (
    DECODER,
    DENOISER,
    ENCODER,
    Family,
    Geometry,
    arch_json,
    config_of,
    local_source,
    module_from_config,
)
from batch_runner.replica.pipeline import empty_component, load_error, torch_dtype


@dataclass(frozen=True)
class Anatomy:
    """A model's components and sizes, from its architecture: what the memory planner needs."""

    family: Family
    roles: dict[str, str]  # component -> encoder | denoiser | decoder
    bytes: dict[str, int]  # component -> bytes of weights in the run's dtype
    block_bytes: int  # the largest block of any denoiser's streamed lists (streamed one at a time)
    denoiser_rest_bytes: int  # a denoiser's weights outside its streamed lists (resident while streaming)
    blocks: int  # repeated blocks per denoiser
    # The two largest single layers of any encoder together: streamed layer by layer, one computes
    # while the next is copied in.
    leaf_bytes: int
    geometry: Geometry
    # The two largest single layers of the VAE(s) together: streamed the same way under full_offload.
    decoder_leaf_bytes: int = 0

    def of_role(self, role: str) -> tuple[str, ...]:
        return tuple(name for name, r in self.roles.items() if r == role)


def anatomy(model: ModelConfig) -> Anatomy:
    """The model's anatomy, built on the meta device from conf/arch/<arch>, the saved pipeline's
    configs (pretrained without an arch) or the tiny pipeline."""
    family = family_of(model)
    dtype = torch_dtype(model.dtype)
    if model.weights == "tiny" or (not model.arch and model.weights != "pretrained"):
        pipe = family.tiny(model)
        modules = {name: getattr(pipe, name) for name in family.components(pipe)}
    elif model.arch:
        shared = _arch_anatomy(model.family, model.arch, model.dtype)
        return replace(shared, roles=dict(shared.roles), bytes=dict(shared.bytes))  # the caller's own dicts
    else:
        source, looks_local = local_source(model)
        try:
            saved = family.pipeline_class.load_config(source, revision=model.revision)
            names = [n for n in family.roles if isinstance(saved.get(n), list | tuple) and saved[n][0]]
            modules = {n: empty_component(family, source, n, dtype, model.revision) for n in names}
        except (OSError, ValueError) as e:
            raise load_error(model, source, looks_local, e) from e
    return _counted(family, modules, dtype)


@functools.cache
def _arch_anatomy(family_name: str, arch: str, dtype_name: str) -> Anatomy:
    """The anatomy of a shipped architecture: a pure function of conf/arch/<arch>'s files (read-only,
    shipped with the package), the family and the dtype, so built once per process. Building a
    full-size model on the meta device takes seconds, and one run asks several times (the settings
    check, dry_run's description, the planner, the replica); so do the tests, per config and budget."""
    family = family_named(family_name)
    with torch.device("meta"):
        modules = {name: module_from_config(arch_json(arch, name)) for name in family.arch_components(arch)}
    return _counted(family, modules, torch_dtype(dtype_name))


def _counted(family: Family, modules: dict[str, torch.nn.Module], dtype: torch.dtype) -> Anatomy:
    """Sizes, blocks and geometry of a model's components, counted in `dtype`."""
    size = torch.finfo(dtype).bits // 8
    roles = {name: family.roles[name] for name in modules}

    def nbytes(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters()) * size

    denoisers = [modules[n] for n, r in roles.items() if r == DENOISER]
    # Streamed, the denoiser moves every list of blocks group by group (a second, smaller list too:
    # Kandinsky 5 Pro's four text blocks are 1.7 GiB), and only the weights outside them stay put.
    streamed = [upstream.block_level_lists(d) for d in denoisers]
    block_bytes = max(nbytes(b) for lists in streamed for blocks in lists for b in blocks)
    rest = max(nbytes(d) - sum(nbytes(b) for b in lists) for d, lists in zip(denoisers, streamed, strict=True))
    leaves = _largest_leaves([modules[n] for n, r in roles.items() if r == ENCODER], nbytes)
    return Anatomy(
        family=family,
        roles=roles,
        bytes={name: nbytes(m) for name, m in modules.items()},
        block_bytes=block_bytes,
        denoiser_rest_bytes=rest,
        blocks=max(len(family.blocks(d)) for d in denoisers),
        leaf_bytes=leaves,
        geometry=family.geometry({name: config_of(m) for name, m in modules.items()}),
        decoder_leaf_bytes=_largest_leaves([modules[n] for n, r in roles.items() if r == DECODER], nbytes),
    )


def _largest_leaves(modules: list[torch.nn.Module], nbytes: Callable[[torch.nn.Module], int]) -> int:
    """Bytes of the two largest single layers of `modules` together: what layer-by-layer streaming
    holds at once (one computing, the next copied in). Layers that share their weights (T5's input
    embedding is its `shared` table) count once."""
    sizes: dict[tuple[int, ...], int] = {}
    for module in modules:
        for m in module.modules():
            if not list(m.children()):
                sizes[tuple(id(p) for p in m.parameters())] = nbytes(m)
    return sum(sorted(sizes.values())[-2:])


def component_bytes(model: ModelConfig) -> dict[str, int]:
    """Bytes of each component's weights in the run's dtype, without loading any weights."""
    return anatomy(model).bytes
