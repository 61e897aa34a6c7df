"""The private torch, diffusers and accelerate names batch_runner uses: still there, in the versions mirrored;
and a public class a library version lacks, refused in one sentence.

A failure here after an upgrade is the signal to re-read each name in the new release, then widen
the versions in batch_runner/upstream.py.
"""

from __future__ import annotations

from importlib.metadata import version

import accelerate
import diffusers
import pytest
import torch

from batch_runner import upstream
from batch_runner.errors import UserError
from batch_runner.families import FAMILY_MODULES, family_named
from batch_runner.families.base import imported, module_from_config
from batch_runner.replica import speed

# batch_runner/upstream.py's, then those of the families' own classes (each family lists its own).
MIRRORS = upstream.MIRRORS + tuple(m for name in FAMILY_MODULES for m in family_named(name).mirrors)
INSTALLED = {"torch": torch.__version__, "diffusers": diffusers.__version__, "accelerate": accelerate.__version__}


def mirrored(version: str, versions: tuple[str, ...]) -> bool:
    """Whether `version` is one of `versions`, or a release of one given as major.minor."""
    release = version.split("+")[0]
    return any(release == v or release.startswith(v + ".") for v in versions)


@pytest.mark.parametrize("library", sorted(INSTALLED))
def test_the_installed_libraries_are_the_versions_the_private_names_were_read_from(library):
    versions = {m.versions for m in MIRRORS + upstream.HOOK_ATTRIBUTES if m.library == library}
    assert len(versions) == 1
    assert mirrored(INSTALLED[library], versions.pop()), (
        f"{library} {INSTALLED[library]} is not a version batch_runner/upstream.py mirrors"
    )


def test_version_matching_takes_releases_of_a_minor_version_and_nothing_else():
    assert mirrored("2.13.0+cpu", ("2.11", "2.13")) and mirrored("0.42.1", ("0.42.1",))
    assert not mirrored("2.1.0", ("2.11",)) and not mirrored("0.42.10", ("0.42.1",))


@pytest.mark.parametrize("mirror", MIRRORS, ids=lambda m: m.path)
def test_each_private_name_still_exists(mirror):
    upstream.resolve(mirror.path)


def test_the_families_list_their_own_internals():
    assert {m.path.split(":")[1] for m in MIRRORS if m not in upstream.MIRRORS} >= {
        "CosmosTransformerBlock.forward",
        "LTX2ImageToVideoPipeline.__call__",
    }


def test_a_name_that_has_gone_is_noticed():
    with pytest.raises(AttributeError):
        upstream.resolve("torch.nn.attention:_no_such_helper")


def test_hook_attributes_are_where_the_libraries_put_them():
    from accelerate.hooks import ModelHook, add_hook_to_module
    from diffusers.hooks import HookRegistry

    module = torch.nn.Linear(2, 2)
    assert upstream.hook_registry(module) is None and not upstream.has_accelerate_hook(module)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    add_hook_to_module(module, ModelHook())
    assert upstream.hook_registry(module) is registry
    assert upstream.has_accelerate_hook(module)


def test_group_offloading_hooks_are_found_kept_onloaded_and_removed():
    from diffusers.hooks import HookRegistry, apply_group_offloading

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    apply_group_offloading(model, onload_device=torch.device("cpu"), offload_type="leaf_level")
    leaf = model[0]
    hook = upstream.group_offloading_hook(leaf)
    assert hook is not None and upstream.group_offloading_hook(torch.nn.Linear(2, 2)) is None
    offload = hook.group.offload_
    upstream.keep_group_onloaded(hook)
    assert hook.group.offload_ is not offload
    registry = HookRegistry.check_if_exists_or_initialize(model)
    for name in upstream.group_offloading_hook_names():
        registry.remove_hook(name, recurse=True)
    assert upstream.group_offloading_hook(leaf) is None


@pytest.mark.parametrize("twin", ["tiny-kandinsky5", "tiny-cosmos", "tiny-wan"])
def test_block_level_lists_are_what_diffusers_streams_block_by_block(twin):
    """The planner charges only the weights outside these lists as resident (anatomy): diffusers'
    block-level offloading must put a group of its own on each of their blocks, and none on any
    other child. Kandinsky 5 (two lists) and Cosmos (a Sequential projection) are the cases."""
    from diffusers.hooks import apply_group_offloading

    from batch_runner.families import family_of

    from .conftest import run_config

    model = run_config("manifest=unused.csv", f"model={twin}").model
    family = family_of(model)
    transformer = family.tiny(model).transformer
    lists = upstream.block_level_lists(transformer)
    assert any(blocks is family.blocks(transformer) for blocks in lists)
    apply_group_offloading(
        transformer, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    hooked = {id(m) for m in transformer.modules() if upstream.group_offloading_hook(m) is not None}
    streamed = {id(block) for blocks in lists for block in blocks}
    assert streamed <= hooked
    assert hooked - streamed == {id(transformer)}  # the rest: one group on the top level


def test_the_attention_dispatcher_knows_the_backends_speed_names():
    from diffusers.models.attention_dispatch import AttentionBackendName

    for name in speed.DISPATCHER_BACKENDS.values():
        AttentionBackendName(name)


def test_the_pipeline_knows_its_execution_device():
    from batch_runner.families.cogvideox import FAMILY

    from .conftest import run_config

    pipe = FAMILY.tiny(run_config("manifest=unused.csv", "model=tiny").model)
    assert upstream.execution_device(pipe) == torch.device("cpu")


@pytest.mark.parametrize(
    ("read", "library", "name"),
    [
        (lambda: imported("diffusers:LTX9ImageToVideoPipeline").__get__(None), "diffusers", "LTX9ImageToVideoPipeline"),
        (lambda: module_from_config({"_class_name": "NoSuchVAE"}), "diffusers", "NoSuchVAE"),
        (lambda: module_from_config({"architectures": ["NoSuchEncoder"]}), "transformers", "NoSuchEncoder"),
    ],
)
def test_a_class_the_installed_library_lacks_is_one_sentence_to_upgrade_it(read, library, name):
    """The newer families' pipelines need a diffusers far above the project's lower bound (0.32):
    a model whose class the installed version lacks is refused by name (exit 2), not a traceback."""
    with pytest.raises(UserError) as refused:
        read()
    message = str(refused.value)
    assert message.startswith(f"{library} {version(library)} has no {name}, which this model needs")
    assert f"pip install -U {library}" in message and "\n" not in message


@pytest.mark.parametrize(
    ("public", "private", "called"),
    [(True, True, "public"), (False, True, "private"), (False, False, None)],
    ids=["torch 2.12 and later", "torch 2.11", "neither"],
)
def test_the_host_cache_is_emptied_through_whichever_name_the_torch_has(monkeypatch, public, private, called):
    """The benchmark empties torch's cache of pinned host blocks between measurements: through the
    public name where torch has it, else torch 2.11's private one, else not at all (no error)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for module, name, present, label in (
        (torch.accelerator, "empty_host_cache", public, "public"),
        (torch._C, "_host_emptyCache", private, "private"),
    ):
        if present:
            monkeypatch.setattr(module, name, lambda label=label: calls.append(label), raising=False)
        else:
            monkeypatch.delattr(module, name, raising=False)
    upstream.empty_host_cache()
    assert calls == ([called] if called else [])
