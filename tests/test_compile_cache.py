"""torch.compile's caches in a folder that outlives the run, set before anything compiles."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config

from batch_runner.replica import compile_cache
from batch_runner.run import runner
from tests.conftest import ROOT, photo, run_config, write_manifest

ENV = "TORCHINDUCTOR_CACHE_DIR"


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts without the variable and with the caches off, and leaves both as found."""
    for name in (ENV, "TORCHINDUCTOR_COMPILE_THREADS", compile_cache.FA4_ENABLED, compile_cache.FA4_DIR):
        monkeypatch.delenv(name, raising=False)
    kept = {"compile_threads": inductor_config.compile_threads, "unsafe_marked_cacheable_functions": {}}
    with inductor_config.patch(fx_graph_cache=False, **kept), functorch_config.patch(enable_autograd_cache=False):
        yield


def test_a_configured_folder_is_used_expanded_and_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.configure("~/compiled") == tmp_path / "home" / "compiled"
    assert os.environ[ENV] == str(tmp_path / "home" / "compiled")
    monkeypatch.chdir(tmp_path)
    compile_cache.configure("rel/cache")
    assert os.environ[ENV] == str(tmp_path / "rel" / "cache")
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    assert not (tmp_path / "rel").exists()  # inductor makes it when it first writes


def test_default_is_per_user_and_kept_but_an_exported_variable_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.configure(None) == tmp_path / ".cache" / "batch_runner" / "inductor"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(ENV)
    assert compile_cache.configure(None) == tmp_path / "xdg" / "batch_runner" / "inductor"
    monkeypatch.setenv(ENV, str(tmp_path / "scratch"))
    assert compile_cache.configure(None) == tmp_path / "scratch"
    assert compile_cache.configure(str(tmp_path / "mine")) == tmp_path / "mine"  # the setting beats the variable


def test_flash_attention_4_keeps_its_kernels_in_the_compile_cache_unless_the_user_chose(tmp_path, monkeypatch):
    """flash-attn-4 compiles each kernel in every process unless told where to keep them (it reads
    these variables when imported; tests/test_fa4.py checks that on a GPU)."""
    compile_cache.configure(str(tmp_path / "cache"))
    assert os.environ[compile_cache.FA4_ENABLED] == "1"
    assert os.environ[compile_cache.FA4_DIR] == str(tmp_path / "cache" / "flash_attn_cute")
    monkeypatch.setenv(compile_cache.FA4_ENABLED, "0")
    monkeypatch.setenv(compile_cache.FA4_DIR, str(tmp_path / "theirs"))
    compile_cache.configure(str(tmp_path / "cache"))
    assert (os.environ[compile_cache.FA4_ENABLED], os.environ[compile_cache.FA4_DIR]) == ("0", str(tmp_path / "theirs"))


def test_compile_workers_share_the_hosts_cores_unless_the_user_chose(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    compile_cache.configure(None, processes_on_host=4)
    assert inductor_config.compile_threads == 4
    compile_cache.configure(None, processes_on_host=1)
    assert inductor_config.compile_threads == 16
    compile_cache.configure(None, processes_on_host=64)
    assert inductor_config.compile_threads == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)), raising=False)
    compile_cache.configure(None, processes_on_host=2)
    assert inductor_config.compile_threads == 32  # inductor's own cap
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
    inductor_config.compile_threads = 3
    compile_cache.configure(None, processes_on_host=4)
    assert inductor_config.compile_threads == 3


@pytest.mark.parametrize("compiles", [True, False], ids=["compiling", "not-compiling"])
def test_the_run_sets_the_cache_before_the_replica_is_built_where_it_compiles(tmp_path, monkeypatch, compiles):
    """A run that compiles points inductor at the cache first; one that does not (the CPU's default)
    leaves inductor alone: importing it costs seconds of every process's start-up."""
    manifest = write_manifest(tmp_path / "jobs.csv", [{"image": str(photo(tmp_path / "a.png")), "prompt": "sea"}])
    cfg = run_config(
        f"manifest={manifest}",
        "model=tiny",
        f"output_dir={tmp_path / 'out'}",
        f"speed.compile_cache_dir={tmp_path}/cc",
        f"speed.compile={'on' if compiles else 'auto'}",
    )
    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def replica(*args, **kwargs):
        seen["env"] = os.environ.get(ENV)
        seen["fx_graph_cache"] = inductor_config.fx_graph_cache
        raise Stop

    monkeypatch.setattr(runner, "Replica", replica)
    with pytest.raises(Stop):
        runner.run(cfg)
    if compiles:
        assert seen == {"env": str(tmp_path / "cc"), "fx_graph_cache": True}
    else:
        assert seen["env"] is None


# Compiles, in a new process, into the cache folder argv names first: "elementwise" (a plain graph) and
# "attention" (a block that chooses its attention kernel inside the compiled region, as our CogVideoX
# attention preference and diffusers' native attention backends do) with the attention helpers left
# unmarked (torch's default), then, dynamo's in-memory state dropped, "attention" again with them marked
# as batch_runner marks them. Prints, for each, the cache counters it moved: inductor's FX-graph hits and
# misses, AOTAutograd's hits and bypasses.
COMPILE = """
import sys
import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from batch_runner.replica import compile_cache

compile_cache.configure(sys.argv[1])
marked = inductor_config.unsafe_marked_cacheable_functions
inductor_config.unsafe_marked_cacheable_functions = {}

def block(q):
    with sdpa_kernel([SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
        return torch.nn.functional.scaled_dot_product_attention(q, q, q).sin()

def moved(group, keys, run):
    before = [counters[group][k] for k in keys]
    run()
    return [counters[group][k] - b for k, b in zip(keys, before)]

def attention():
    torch._dynamo.reset()  # compile again: nothing kept in memory from a compile before
    with torch.no_grad():
        g = torch.compile(block, dynamic=False)
        q = torch.randn(1, 2, 8, 16)
        print(*moved("aot_autograd", ("autograd_cache_hit", "autograd_cache_bypass"), lambda: g(q)))

f = torch.compile(lambda x: torch.sin(x) * 2 + x.cos(), dynamic=False)
print(*moved("inductor", ("fxgraph_cache_hit", "fxgraph_cache_miss"), lambda: f(torch.randn(8, 8))))
attention()
inductor_config.unsafe_marked_cacheable_functions = marked
attention()
"""


@pytest.fixture(scope="module")
def starts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two processes compiling into one new cache folder, one after the other (each cold compile costs
    half a minute on two cores, so the tests below share these), each compiling with the attention
    helpers unmarked and then marked. Returns each start's counters by name, and the folder."""
    cache = tmp_path_factory.mktemp("compile") / "cache"
    env = {k: v for k, v in os.environ.items() if k != ENV} | {"PYTHONPATH": str(ROOT)}

    def compile_in_a_new_process() -> list[tuple[int, int]]:
        proc = subprocess.run(
            [sys.executable, "-c", COMPILE, str(cache)], capture_output=True, text=True, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [tuple(int(n) for n in line.split()) for line in proc.stdout.splitlines()]

    first, first_attention, marked = compile_in_a_new_process()
    fxgraph_written = (cache / "fxgraph").is_dir()
    second, second_attention, marked_again = compile_in_a_new_process()
    return {
        "elementwise": [first, second],
        "fxgraph_written": fxgraph_written,
        "unmarked": [first_attention, second_attention],
        "marked": [marked, marked_again],
    }


def test_a_second_process_loads_what_the_first_compiled(starts):
    assert starts["elementwise"] == [(0, 1), (1, 0)]  # (hits, misses): compiled, then loaded
    assert starts["fxgraph_written"]


def test_a_block_that_chooses_its_attention_kernel_is_loaded_whole_from_the_cache(starts):
    # (hits, bypasses). torch's default: the graph is refused by AOTAutograd's cache, so every start
    # traces it again.
    assert starts["unmarked"] == [(0, 1), (0, 1)]
    # Marked, the first start stores it and the next loads it whole.
    assert starts["marked"] == [(0, 0), (1, 0)]
