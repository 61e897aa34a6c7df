"""The fast lane holds in-process tests only: what starts a process is marked slow, or fails."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

from tests import conftest
from tests.conftest import StartedAProcess, _starts_processes, run_cli


def _launches_through_a_helper() -> None:
    run_cli("--help")


def _calls_a_launching_helper() -> None:
    _launches_through_a_helper()


def _names_conftest_run_cli() -> None:
    conftest.run_cli("--help")


def _pure(x: int) -> int:
    return sorted([x, 1])[0]


def test_a_test_reaching_run_cli_or_subprocess_through_helpers_is_seen_to_start_processes() -> None:
    # Looked up by name: a test naming these helpers would itself be marked slow, as it should be.
    here, shared = globals(), vars(conftest)
    assert _starts_processes(here["_calls_a_launching_helper"], set())
    assert _starts_processes(shared["made_by_one_process_and_by_two"], set())
    assert _starts_processes(shared["made_from_a_saved_folder"], set())
    assert _starts_processes(here["_names_conftest_run_cli"], set())
    assert _starts_processes(vars(importlib.import_module("tests.test_host_weights"))["run_processes"], set())
    assert not _starts_processes(_pure, set())
    assert not _starts_processes(conftest.run_config, set())
    assert not _starts_processes(conftest.photo, set())


def test_an_unmarked_test_that_starts_a_process_anyway_fails_with_a_sentence() -> None:
    """Reached in a way the reading of the code cannot see: the guard still refuses it."""
    spawn = importlib.import_module("sub" + "process").run
    with pytest.raises(StartedAProcess, match="not marked slow"):
        spawn([sys.executable, "-c", "pass"])
    with pytest.raises(StartedAProcess, match="not marked slow"):
        getattr(importlib.import_module("os"), "sy" + "stem")("true")


def test_this_module_runs_in_the_fast_lane(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("slow") is None


def test_the_suites_processes_take_the_thread_count_set_before_torch_was_imported() -> None:
    """tests/__init__.py sets OMP_NUM_THREADS (1 unless exported) before anything imports torch: the
    workers and the processes they launch then share two cores without spinning threads."""
    import torch

    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
