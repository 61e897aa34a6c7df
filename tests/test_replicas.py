"""replica.gpus=k: replicas of k processes, each splitting every video with diffusers' context parallelism.

On the CPU diffusers' Ulysses attention runs over gloo, so four processes in two replicas of two
make every video exactly once, written by each replica's leader, with the frames that independent
processes make. Ring attention needs a GPU kernel (tests/test_gpu_replicas.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batch_runner.cluster.cluster import Cluster
from batch_runner.cluster.parallel import Team, replica_ranks, split_attention
from batch_runner.cluster.sharding import LocalCounter
from batch_runner.errors import UserError
from batch_runner.inputs.manifest import load_manifest
from batch_runner.replica.planner import workload_of
from batch_runner.run import runner
from batch_runner.run.checks import check_replica_rows, check_settings
from batch_runner.run.dry_run import describe
from tests.conftest import ROOT, accelerate_cpu, frames_of, ok, photo, run_cli, run_config, write_manifest

# --- forming replicas -----------------------------------------------------------------------------


@given(st.integers(1, 64), st.integers(1, 64))
def test_replicas_cover_every_rank_exactly_once(replicas: int, gpus: int) -> None:
    world = replicas * gpus
    groups = replica_ranks(world, gpus)
    assert sorted(r for g in groups for r in g) == list(range(world))
    assert len(groups) == replicas and all(len(g) == gpus for g in groups)
    for index, group in enumerate(groups):
        assert all(rank // gpus == index for rank in group)  # a process finds its replica by rank // k
        assert group == list(range(group[0], group[0] + gpus))  # consecutive: one host when k divides it


@given(st.integers(1, 200), st.integers(2, 64))
def test_replicas_refuse_a_world_they_do_not_divide(world: int, gpus: int) -> None:
    if world % gpus == 0:
        return
    with pytest.raises(ValueError):
        replica_ranks(world, gpus)


# --- refused before anything loads ----------------------------------------------------------------


def refusal(monkeypatch: pytest.MonkeyPatch, world: int, *overrides: str) -> str:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(UserError) as caught:
        check_settings(run_config("manifest=x.csv", *overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_world_the_replica_size_does_not_divide_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, 3, "model=tiny-wan", "replica.gpus=2")
    assert "replica.gpus=2 does not divide the 3 process(es)" in message
    assert "--num_processes 2" in message and "replica.gpus=1" in message


@pytest.mark.parametrize("model", ["tiny", "tiny-ltx"])  # CogVideoX: no _cp_plan; LTX: see families/ltx/family.py
def test_a_family_diffusers_cannot_split_is_refused(monkeypatch: pytest.MonkeyPatch, model: str) -> None:
    message = refusal(monkeypatch, 2, f"model={model}", "replica.gpus=2")
    assert message.startswith("replica.gpus=2 needs a model whose transformer diffusers can split")
    assert "set replica.gpus=1" in message


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("speed.attention=math", "speed.attention='math'"),
        ("speed.cache=first_block", "speed.cache='first_block'"),
        ("replica.attention=ring", "replica.attention=ring needs a GPU"),  # no CUDA here
        ("replica.attention=tree", "replica.attention='tree' is not one of ulysses, ring"),
    ],
)
def test_settings_a_replica_cannot_run_alike_are_refused(monkeypatch, override: str, named: str) -> None:
    assert named in refusal(monkeypatch, 2, "model=tiny-wan", "replica.gpus=2", override)


def test_one_gpu_per_replica_and_split_families_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    check_settings(run_config("manifest=x.csv", "model=tiny"))
    for model in ("tiny-wan", "tiny-wan22", "tiny-wan22-ti2v"):
        check_settings(run_config("manifest=x.csv", f"model={model}", "replica.gpus=2"))
        check_settings(run_config("manifest=x.csv", f"model={model}", "replica.gpus=4"))


def test_rows_whose_tokens_the_replica_cannot_split_evenly_are_refused(tmp_path: Path) -> None:
    # tiny-wan: 16x16 pixels per token, 9 frames make 3 latent frames: 64x96 -> 3*4*6 = 72 tokens.
    rows = [{"id": "even", "image": str(photo(tmp_path / "a.png")), "prompt": "p", "height": 64, "width": 96}]
    cfg = run_config(f"manifest={write_manifest(tmp_path / 'ok.csv', rows)}", "model=tiny-wan", "replica.gpus=2")
    check_replica_rows(cfg, load_manifest(cfg.manifest, cfg.model, 0).jobs)
    cfg = run_config(f"manifest={cfg.manifest}", "model=tiny-wan", "replica.gpus=5")
    with pytest.raises(UserError, match=r"^Row id 'even': 9 frames at 96x64 make 72 tokens, which replica.gpus=5"):
        check_replica_rows(cfg, load_manifest(cfg.manifest, cfg.model, 0).jobs)


def test_a_head_count_ulysses_cannot_share_is_refused() -> None:
    denoiser = SimpleNamespace(config={"num_attention_heads": 2})  # tiny-wan's
    team = Team(index=0, count=1, ranks=[0, 1, 2, 3], rank=0)
    with pytest.raises(UserError, match=r"^replica.gpus=4 does not divide SimpleNamespace's 2 attention heads"):
        split_attention(denoiser, team, "ulysses")


def test_a_run_of_one_process_refuses_before_its_output_folder(tmp_path: Path, monkeypatch) -> None:
    """In-process, the runner as run.py calls it: a refusal (UserError) is exit 2 with its sentence on
    the command line, as tests/test_cli.py's missing model shows once, through a real process."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "out"
    cfg = run_config(f"manifest={ROOT / 'examples/jobs.csv'}", "model=tiny-wan", "replica.gpus=2", f"output_dir={out}")
    with pytest.raises(UserError, match=r"replica.gpus=2 does not divide the 1 process\(es\) started"):
        runner.run(cfg)
    assert not out.exists()


def test_the_planner_splits_activations_but_not_weights() -> None:
    one = workload_of(run_config("manifest=x.csv", "model=wan2.2-ti2v-5b"))
    two = workload_of(run_config("manifest=x.csv", "model=wan2.2-ti2v-5b", "replica.gpus=2"))
    assert two.tokens == -(-one.tokens // 2)
    assert (two.hidden, two.pixels, two.vae_channels) == (one.hidden, one.pixels, one.vae_channels)


# --- end to end: 4 processes, 2 replicas of 2 -------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("replicas")
    rows = [
        {"id": f"r{i}", "image": str(photo(folder / f"{i}.png", seed=i)), "prompt": f"prompt {i % 3}", "seed": i}
        for i in range(5)
    ]
    rows[3]["num_frames"] = 13
    return write_manifest(folder / "jobs.csv", rows)


def settings(manifest: Path, out: Path, *overrides: str) -> list[str]:
    return [f"manifest={manifest}", "model=tiny-wan", f"output_dir={out}", "output.crf=0", "chunk_size=2", *overrides]


def launch(manifest: Path, out: Path, processes: int, *overrides: str):
    return run_cli(*settings(manifest, out, *overrides), launcher=accelerate_cpu(processes))


@pytest.fixture(scope="module")
def independent(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every row made whole by one process (this one: the runner as run.py calls it), to compare with."""
    out = tmp_path_factory.mktemp("independent") / "out"
    assert runner.run(run_config(*settings(inputs, out))) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("scheduling", ["dynamic", "static"])
def test_two_replicas_of_two_make_every_row_once_by_their_leaders(
    inputs: Path, independent: Path, tmp_path: Path, scheduling: str
) -> None:
    out = tmp_path / "out"
    proc = launch(inputs, out, 4, "replica.gpus=2", f"scheduling={scheduling}")
    ok(proc)
    ids = [f"r{i}" for i in range(5)]
    table = pd.read_parquet(out / "results.parquet")
    assert sorted(table["id"]) == ids and set(table["status"]) == {"ok"}
    assert set(table["rank"]) <= {0, 2} and set(table["gpus_per_replica"]) == {2}
    if scheduling == "static":  # shares per replica, not per process
        assert dict(zip(table["id"], table["rank"], strict=True)) == {"r0": 0, "r1": 0, "r2": 0, "r3": 2, "r4": 2}
    # Every row recorded exactly once, by a leader: only ranks 0 and 2 keep a results log.
    records = [json.loads(line) for part in sorted((out / "parts").iterdir()) for line in part.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ids
    assert {p.name.split(".")[1] for p in (out / "parts").iterdir()} <= {"rank00000", "rank00002"}
    assert sorted(p.name for p in (out / "videos").iterdir()) == [f"{i}.mp4" for i in ids]
    for member in ("rank00001.log", "rank00003.log"):  # members make rows but record none
        assert " ok in " not in (out / "logs" / member).read_text()
    for row_id in ids:  # the same frames as independent processes make (float32: identical here)
        split, whole = frames_of(out / "videos" / f"{row_id}.mp4"), frames_of(independent / "videos" / f"{row_id}.mp4")
        assert split.shape == whole.shape
        assert np.abs(split.astype(int) - whole.astype(int)).max() <= 1, row_id


def test_dry_run_shows_the_replicas(inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the dry run of 4 processes in replicas of 2 prints, described in-process for a cluster of 4
    (a dry run launched through accelerate, nothing loaded or written, is tests/test_outputs.py's)."""
    out = tmp_path / "never"
    cfg = run_config(*settings(inputs, out, "replica.gpus=2", "dry_run=true"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    check_settings(cfg)  # the launch's settings pass
    four = Cluster(state=SimpleNamespace(num_processes=4, device=torch.device("cpu")), counter=LocalCounter())
    text = describe(cfg, load_manifest(cfg.manifest, cfg.model, cfg.seed), four, out)
    assert "4 process(es) in 2 replica(s) of 2 GPUs (ulysses attention)" in text
    assert "replica 0 (processes 0-1): ~3 rows (r0, r1, r2)" in text
    assert "replica 1 (processes 2-3): ~2 rows (r3, r4)" in text
    assert not out.exists()


def test_readme_documents_replicas() -> None:
    text = (ROOT / "README.md").read_text()
    assert "### Replicas of several GPUs" in text and "replica.gpus" in text
