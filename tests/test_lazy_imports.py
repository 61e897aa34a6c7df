"""A run imports diffusers and transformers only to build a model: not to check its settings or rows,
to refuse them, or to start. Together they cost every process 3-4 s of CPU, and most processes of
the tests (and many of a user's) refuse a row or a setting and load no model.

Checked in process: batch_runner is imported afresh where diffusers and transformers cannot be
imported (as if they were not installed), and each check runs there; afterwards the session's own
modules are put back. A module-level import of either, or one inside a function these paths call,
fails the test with the import's traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT, photo, run_config, write_manifest

BUILDING_ONLY = ("diffusers", "transformers")
MODELS = sorted(path.stem for path in (ROOT / "conf" / "model").glob("*.yaml"))
# What run.py imports before it knows whether it will load a model, and every family.
ENTRY_MODULES = (
    "batch_runner.run.cli",
    "batch_runner.run.runner",
    "batch_runner.run.preflight",
    "batch_runner.run.dry_run",
    "batch_runner.run.launch",
    "batch_runner.run.overrides",
)


class _Refuse(importlib.abc.MetaPathFinder):
    """Finds nothing of the libraries a model build needs: importing them raises."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] in BUILDING_ONLY:
            raise ImportError(f"{name} was imported on a path that builds no model")


# Kept, not imported afresh: importing it registers its torch op process-wide (torch.library), and a
# second registration would leave torch calling the fresh copy after the session's is back. It imports
# torch alone.
REGISTERS_ON_IMPORT = ("batch_runner.replica.fa4",)


def _ours_or_blocked(name: str) -> bool:
    return name.split(".")[0] in ("batch_runner", *BUILDING_ONLY) and name not in REGISTERS_ON_IMPORT


@contextlib.contextmanager
def without_model_libraries() -> Iterator[None]:
    """batch_runner imported afresh, diffusers and transformers unimportable; then the session's modules back."""
    saved = {name: module for name, module in sys.modules.items() if _ours_or_blocked(name)}
    for name in saved:
        del sys.modules[name]
    refuse = _Refuse()
    sys.meta_path.insert(0, refuse)
    try:
        yield
    finally:
        sys.meta_path.remove(refuse)
        for name in [name for name in sys.modules if _ours_or_blocked(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


def bad_manifest(tmp_path: Path) -> Path:
    """One row that every model refuses: 18 frames is no family's frame count."""
    row = {"id": "a", "image": str(photo(tmp_path / "a.png")), "prompt": "p", "num_frames": 18}
    return write_manifest(tmp_path / "jobs.csv", [row])


def test_the_guard_fails_a_path_that_imports_diffusers_and_puts_the_sessions_modules_back():
    import diffusers

    import batch_runner.families

    with without_model_libraries(), pytest.raises(ImportError, match="builds no model"):
        importlib.import_module("batch_runner.families")
        importlib.import_module("diffusers.models")
    assert sys.modules["diffusers"] is diffusers and sys.modules["batch_runner.families"] is batch_runner.families


def test_the_command_lines_modules_and_every_family_import_neither_library():
    from batch_runner.families import FAMILY_MODULES

    with without_model_libraries():
        for name in (*ENTRY_MODULES, *(f"batch_runner.families.{family}" for family in FAMILY_MODULES)):
            importlib.import_module(name)


@pytest.mark.parametrize("name", MODELS)
def test_checking_a_models_settings_rows_and_memory_terms_imports_neither_library(tmp_path, name):
    cfg = run_config("manifest=x", f"model={name}")
    manifest = bad_manifest(tmp_path)
    with without_model_libraries():
        from batch_runner.families import family_of
        from batch_runner.families.base import arch_json
        from batch_runner.inputs.manifest import load_manifest
        from batch_runner.run.checks import check_settings

        model = cfg.model
        family = family_of(model)
        check_settings(cfg)
        family.options(model)
        family.salted_options(model)
        family.takes_last_image(model)
        assert family.activations.decode_per_pixel > 0
        assert family.row_problems(model, model.num_frames + 1, model.height + 1, model.width + 1, 1)
        if model.arch:
            configs = {component: arch_json(model.arch, component) for component in family.arch_components(model.arch)}
            assert family.geometry(configs).tokens(model.num_frames, model.height, model.width, 1) > 0
        assert load_manifest(str(manifest), model, cfg.seed, cfg.ids, cfg.output.format).problems


def test_a_launch_that_refuses_a_row_before_starting_its_processes_imports_neither_library(tmp_path):
    args = [f"manifest={bad_manifest(tmp_path)}", "model=tiny", f"output_dir={tmp_path / 'out'}"]
    with without_model_libraries():
        from batch_runner.errors import UserError
        from batch_runner.run.preflight import preflight

        with pytest.raises(UserError, match="num_frames"):
            preflight(args, ROOT / "conf", 2)


@pytest.fixture
def logging_as_it_was(monkeypatch):
    """The root logger and the libraries' loggers as they were, and the verbosity variables unset meanwhile."""
    names = ("", "diffusers", "transformers", "accelerate", "torch._dynamo", "torch._inductor")
    saved = [(logger, logger.level, list(logger.handlers)) for logger in map(logging.getLogger, names)]
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(variable, raising=False)
    yield
    for logger, level, handlers in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers


def test_setting_up_the_logs_imports_neither_library_yet_leaves_both_quiet(logging_as_it_was):
    """Each reads its variable when first imported; one imported already is told directly."""
    with without_model_libraries():
        from batch_runner.run.logs import setup_logging

        setup_logging("INFO", 0, 1)
    assert os.environ["DIFFUSERS_VERBOSITY"] == os.environ["TRANSFORMERS_VERBOSITY"] == "error"

    from diffusers.utils import logging as diffusers_logging

    from batch_runner.run.logs import setup_logging

    diffusers_logging.set_verbosity_warning()
    setup_logging("INFO", 0, 1)
    assert diffusers_logging.get_verbosity() == logging.ERROR
