"""A plan per row shape, VAE tiling decided by the plan, and switching placement between rows
(issues #26 item 1, #23): in-process, from the models' anatomies and the tiny model on the CPU."""

from __future__ import annotations

import functools
import re
from dataclasses import replace

import pytest
import torch

from batch_runner.errors import UserError
from batch_runner.families.rules import valid_frame_counts
from batch_runner.inputs.manifest import Job
from batch_runner.replica import placement, planner
from batch_runner.replica.anatomy import anatomy
from batch_runner.replica.planner import RowPlans, Shape, plan_rows

from .conftest import run_config


def job(frames: int, height: int, width: int, guidance: float = 3.0, row_id: str = "x") -> Job:
    return Job(0, row_id, "x.png", "p", "", 0, frames, height, width, 24.0, 30, guidance)


@functools.cache
def counted(name: str, *overrides: str) -> tuple:
    cfg = run_config("manifest=unused.csv", f"model={name}", "memory.host_budget_gib=512", *overrides)
    return cfg, anatomy(cfg.model)


def test_rows_that_fit_a_faster_plan_run_under_it():
    """One large row must not push the small ones onto its slower plan."""
    cfg, model = counted("cogvideox-5b-i2v")
    small, large = job(49, 240, 360, row_id="small"), job(49, 480, 720, row_id="large")
    plans = plan_rows(cfg, 24.0, 1, [small, large, small], model)
    assert plans.for_job(small).plan == "none"
    assert plans.for_job(large).plan == "text_offload"
    # The one-plan-for-all choice, for comparison: the largest row's.
    assert planner.auto_plan(cfg, 24.0, 1, [small, large], model).plan == "text_offload"
    assert [p.plan for p in plans.placements] == ["none", "text_offload"]  # fastest first
    assert plans.slowest.plan == "text_offload"
    # The allocator's collection threshold sits above the most any of them plans to reserve.
    assert plans.planned_gib == max(p.gpu_gib for p in plans.placements) == plans.for_job(small).gpu_gib
    # Each shape is planned once, in order of first appearance, and says which rows it serves.
    assert [str(s) for s, _ in plans.by_shape] == ["240x360x49", "480x720x49"]
    lines = plans.lines()
    assert lines[0].startswith("rows of 240x360x49: none: needs ~")
    assert lines[1].startswith("rows of 480x720x49: text_offload: needs ~")


def test_the_ltx_13b_manifest_of_the_issue_runs_every_row_under_group_offload_in_12_gib():
    """#26: at memory.budget_gib=12, one 480x1216x97 row pushed all three rows onto
    sequential_cpu_offload; each shape now gets the fastest plan that fits it."""
    cfg, model = counted("ltx-video-13b-0.9.7-dev")
    rows = [job(161, 512, 768), job(161, 768, 512), job(97, 480, 1216)]
    plans = plan_rows(cfg, 12.0, 1, rows, model)
    for row in rows:
        chosen = plans.for_job(row)
        assert chosen.plan == "group_offload", chosen.reason
        assert chosen.gpu_gib <= 12.0
    # The first row under group_offload decoding whole frames (the plan's choice at 12 GiB) peaked at
    # 8.62 GiB on the H200 (docs/experiments/2026-12-04): the estimate is within 1.3x of it.
    first = plans.for_job(rows[0])
    assert not first.vae_tiling and 8.62 <= first.gpu_gib <= 1.3 * 8.62


def test_the_dry_run_prints_the_plan_of_each_row_shape(tmp_path):
    """With no model loaded: the dry run imports no replica module (test_memory checks the imports)."""
    from batch_runner.cluster.cluster import join_cluster
    from batch_runner.inputs.manifest import load_manifest
    from batch_runner.run.dry_run import describe

    from .conftest import photo, write_manifest

    image = str(photo(tmp_path / "in.png"))
    rows = [
        {"id": "small", "image": image, "prompt": "sea", "height": 256, "width": 448},
        {"id": "large", "image": image, "prompt": "car", "height": 480, "width": 832},
    ]
    manifest_path = write_manifest(tmp_path / "jobs.csv", rows)
    overrides = ("model=wan2.1-i2v-14b-480p", "memory.budget_gib=50", "memory.host_budget_gib=512", "dry_run=true")
    cfg = run_config(f"manifest={manifest_path}", *overrides)
    manifest = load_manifest(cfg.manifest, cfg.model, cfg.seed)
    assert manifest.problems == []
    text = describe(cfg, manifest, join_cluster(cpu=True), tmp_path / "out")
    assert "memory plans, one per row shape (rows of one plan run together):" in text
    assert "  rows of 256x448x81: none: needs ~" in text
    assert "  rows of 480x832x81: text_offload: needs ~" in text


def test_the_dry_runs_estimate_takes_one_cards_newest_record_at_the_nearest_budget_and_names_the_card(
    tmp_path, monkeypatch
):
    """Cards differ by a third on some models and later code is faster: the estimate mixes neither,
    and its line names the card its records are from."""
    import json

    from batch_runner.run import dry_run

    def record(gpu: str, budget: float | None, step: float, outside: float = 10.0, **more) -> dict:
        times = {"seconds_per_step": step, "seconds_outside_steps": outside}
        return {"gpu": gpu, "model": "ltx-2", "plan": "none", "frames": 121, "budget_gib": budget} | times | more

    records = [
        record("H100", None, 1.0),  # older code
        record("H100", 48.0, 1.5),
        record("H100", None, 0.5),  # the newest at no budget
        record("H100", None, 0.1, changes_output=True),  # an approximation: never an estimate
        # Measured under allocator settings of the benchmark's own environment, not the run's: never.
        record("H100", None, 0.3, allocator_env={"PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.7"}),
        {"gpu": "H100", "model": "ltx-2", "recipe": "ref-gpu", "seconds_per_step": 0.2, "frames": 121},
        record("H200", None, 2.0),  # the newest record of all
    ]
    path = tmp_path / "benchmarks.json"
    path.write_text(json.dumps(records))
    monkeypatch.setattr(dry_run, "BENCHMARKS", path)
    cfg, _ = counted("ltx-2")
    row = replace(job(121, 512, 768), num_inference_steps=40)
    assert dry_run._estimate_seconds(cfg, None, None, [row], "H100") == (10.0 + 40 * 0.5, "H100")
    assert dry_run._estimate_seconds(cfg, None, 48.0, [row], "H100") == (10.0 + 40 * 1.5, "H100")
    assert dry_run._estimate_seconds(cfg, None, None, [row], None) == (10.0 + 40 * 2.0, "H200")
    assert dry_run._estimate_seconds(cfg, None, None, [row], "B200") == (10.0 + 40 * 2.0, "H200")
    half = replace(row, num_frames=61, num_inference_steps=20)
    assert dry_run._estimate_seconds(cfg, None, None, [half], "H100") == ((10.0 + 20 * 0.5) * 61 / 121, "H100")


def test_a_row_of_a_shape_not_planned_for_gets_the_slowest_placement():
    cfg, model = counted("cogvideox-5b-i2v")
    plans = plan_rows(cfg, 24.0, 1, [job(49, 240, 360), job(49, 480, 720)], model)
    assert plans.for_job(job(49, 320, 480)) == plans.slowest


def test_no_rows_plan_the_default_row_and_no_gpu_runs_everything_in_place():
    cfg, model = counted("cogvideox-5b-i2v")
    plans = plan_rows(cfg, 24.0, 1, [], model)
    assert [s for s, _ in plans.by_shape] == [planner.default_shape(cfg)]
    cpu = plan_rows(cfg, None, 1, [job(49, 240, 360)], model)
    assert cpu.default.plan == "none" and cpu.default.gpu_gib is None
    assert cpu.planned_gib is None
    assert cpu.default.vae_tiling == cfg.memory.vae_tiling  # nothing to fit on the CPU: as configured


def test_a_configured_plan_holds_for_every_shape():
    cfg, model = counted("cogvideox-5b-i2v", "memory=group_offload")
    plans = plan_rows(cfg, 24.0, 1, [job(49, 240, 360), job(49, 480, 720)], model)
    assert {p.plan for p in plans.placements} == {"group_offload"}
    assert all("chosen in the config (memory=group_offload)" in p.reason for p in plans.placements)


# --- VAE tiling, decided by the plan (#23) -------------------------------------------------------------


def test_without_a_budget_a_big_card_decodes_whole_frames():
    """Wan 2.1 480p on a 140 GiB card: tiling cost 7.83 s outside the steps against 3.09 s whole."""
    cfg, model = counted("wan2.1-i2v-14b-480p")
    chosen = plan_rows(cfg, 139.0, 1, [], model).default
    assert (chosen.plan, chosen.vae_tiling, chosen.vae_tile) == ("none", False, None)
    assert chosen.whole_decode_gib > 0
    assert "whole-frame VAE decoding" in chosen.reason
    # Its estimate counts the whole-frame decode, not a tile's.
    workload = planner.workload_of(cfg, (), model)
    tiled = planner.estimate("none", model, workload, cfg.memory)
    whole = planner.estimate("none", model, workload, replace(cfg.memory, vae_tiling=False))
    assert whole.decode_gib > tiled.decode_gib
    assert chosen.gpu_gib == whole.gpu_gib and chosen.whole_decode_gib == whole.decode_gib


def test_tiles_only_where_the_whole_frame_decode_does_not_fit():
    cfg, model = counted("hunyuanvideo1.5-i2v-480p")
    workload = planner.workload_of(cfg, (), model)
    whole = planner.estimate("none", model, workload, replace(cfg.memory, vae_tiling=False)).gpu_gib
    tiled = planner.estimate("none", model, workload, cfg.memory).gpu_gib
    assert tiled < whole
    roomy = plan_rows(cfg, whole + 1, 1, [], model).default
    assert (roomy.plan, roomy.vae_tiling) == ("none", False)
    tight = plan_rows(cfg, (whole + tiled) / 2, 1, [], model).default
    assert (tight.plan, tight.vae_tiling, tight.vae_tile) == ("none", True, None)
    assert "VAE decoding in tiles (whole frames would need ~" in tight.reason
    assert tight.whole_decode_gib == roomy.whole_decode_gib  # the planner's term, in the placement


def test_rows_that_fit_no_plan_are_named_with_the_most_frames_that_would_fit():
    """The refusal names the rows of the shape that fits nowhere and the longest valid frame count at
    their size that does fit: the frame count just above it fits no plan."""
    cfg, model = counted("cosmos-predict2.5-2b")
    short = [job(29, 704, 1280, row_id=f"short{i}") for i in range(2)]
    long = [job(93, 704, 1280, row_id=f"long{i}") for i in range(5)]
    plan_rows(cfg, 4.0, 1, short, model)  # the short rows alone fit
    with pytest.raises(UserError) as refused:
        plan_rows(cfg, 4.0, 1, [*short, *long], model)
    message = str(refused.value)
    assert message.startswith("rows of 704x1280x93 ('long0', 'long1', 'long2' and 2 more): No memory plan fits: ")
    assert "'short" not in message
    fitting = int(re.search(r"Or make the rows shorter: at 704x1280, num_frames=(\d+) fits\. ", message).group(1))
    assert message.endswith("Or pass on_invalid=skip to record the rows no plan fits as failed and make the others.")
    valid = valid_frame_counts(cfg.model)
    plan_rows(cfg, 4.0, 1, [job(fitting, 704, 1280)], model)
    with pytest.raises(UserError):
        plan_rows(cfg, 4.0, 1, [job(valid[valid.index(fitting) + 1], 704, 1280)], model)


def test_rows_of_every_shape_that_fits_no_plan_are_named():
    cfg, model = counted("cosmos-predict2.5-2b")
    rows = [job(29, 704, 1280, row_id="a"), job(93, 704, 1280, row_id="b")]
    with pytest.raises(UserError, match=r"^rows of 704x1280x29 \('a'\): No memory plan fits: ") as refused:
        plan_rows(cfg, 1.0, 1, rows, model)
    assert str(refused.value).endswith(
        "No frame count fits at 704x1280 either. Rows of 704x1280x93 fit no plan either."
    )  # and no word of on_invalid=skip: no row would be made
    skipping, _ = counted("cosmos-predict2.5-2b", "on_invalid=skip")
    with pytest.raises(UserError, match=r"^rows of 704x1280x29 \('a'\): "):
        plan_rows(skipping, 1.0, 1, rows, model)


def test_under_skip_the_rows_no_plan_fits_are_kept_with_why_and_the_others_planned():
    cfg, model = counted("cosmos-predict2.5-2b", "on_invalid=skip")
    short, long = job(29, 704, 1280, row_id="short"), job(93, 704, 1280, row_id="long")
    plans = plan_rows(cfg, 4.0, 1, [short, long], model)
    assert plans.misfit(short) is None and plans.for_job(short).plan == "group_offload"
    why = plans.misfit(long)
    assert why.startswith("No memory plan fits: ") and re.search(r"at 704x1280, num_frames=\d+ fits\.$", why)
    assert [str(s) for s, _ in plans.by_shape] == ["704x1280x29"]
    assert plans.lines()[-1] == f"rows of 704x1280x93: recorded as failed (on_invalid=skip): {why}"


def test_the_users_vae_settings_stand():
    cfg, model = counted("hunyuanvideo1.5-i2v-480p", "memory.vae_tiling=false")
    assert not plan_rows(cfg, 139.0, 1, [], model).default.vae_tiling  # never tiles
    with pytest.raises(UserError, match="No memory plan fits"):  # not even where tiles would have fitted
        plan_rows(cfg, 24.0, 1, [], model)
    cfg, model = counted("hunyuanvideo1.5-i2v-480p", "memory.vae_tile=192")
    fixed = plan_rows(cfg, 139.0, 1, [], model).default
    assert (fixed.vae_tiling, fixed.vae_tile) == (True, 192)  # a tile the user sets always tiles


# --- switching placement between shapes ------------------------------------------------------------------


def test_host_copies_bring_a_component_back_to_the_very_same_host_tensors():
    """Switching plans must not copy the host-shared, pinned weights: they are pointed at again."""
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    before = {name: t.data_ptr() for name, t in module.state_dict().items()}
    copies = placement.HostCopies(keep=("m",))
    copies.to_device("m", module, torch.device("meta"))
    assert all(t.device.type == "meta" for t in module.state_dict().values())
    copies.to_host("m", module)
    assert {name: t.data_ptr() for name, t in module.state_dict().items()} == before


def test_host_copies_keep_nothing_of_a_component_no_plan_keeps_on_the_host():
    module = torch.nn.Linear(4, 4)
    copies = placement.HostCopies(keep=())
    copies.to_device("m", module, torch.device("meta"))
    assert copies.saved == {}


def test_the_replica_runs_each_row_under_its_shapes_placement_and_orders_rows_by_plan(monkeypatch):
    from batch_runner.replica import replica as replica_module

    cfg = run_config("manifest=unused.csv", "model=tiny")
    small, large = job(9, 32, 32, row_id="small"), job(9, 48, 48, row_id="large")
    fast = planner.Placement("none", "fast")
    slow = planner.Placement("text_offload", "slow")
    plans = RowPlans(
        ((planner.shape_of(small), fast), (planner.shape_of(large), slow)),
        slow,
    )
    monkeypatch.setattr(planner, "place", lambda *args, **kwargs: plans)
    applied: list[str] = []
    real_apply = placement.apply_plan
    monkeypatch.setattr(
        placement, "apply_plan", lambda pipe, p, *a, **k: (applied.append(p.plan), real_apply(pipe, p, *a, **k))
    )
    replica = replica_module.Replica(cfg, torch.device("cpu"), jobs=[small, large])
    assert replica.plan == "none" and applied == ["none"]
    # The current placement's rows first, then by plan: one switch for the chunk, not one per row.
    ordered = replica.order([large, small, large, small])
    assert [j.id for j in ordered] == ["small", "small", "large", "large"]
    replica.prepare(large)
    replica.prepare(large)
    assert replica.plan == "text_offload" and applied == ["none", "text_offload"]
    assert replica.placement_for(small) is fast


def test_shape_names_read_as_the_manifest_gives_them():
    assert str(Shape(161, 512, 768, True)) == "512x768x161"
    assert str(Shape(9, 32, 32, False)) == "32x32x9 unguided"


@pytest.mark.parametrize("plan", ["none", "text_offload", "group_offload"])
def test_placement_ranks_follow_the_ladder(plan):
    assert planner.Placement(plan, "").rank == planner.PLANS.index(plan)


def test_out_of_memory_in_a_whole_frame_decode_steps_down_to_tiles_and_elsewhere_to_the_next_plan(monkeypatch):
    from types import SimpleNamespace

    from batch_runner.replica import replica as replica_module

    cfg = run_config("manifest=unused.csv", "model=tiny")
    row = job(9, 32, 32)
    whole = planner.Placement("none", "whole frames", vae_tiling=False)
    monkeypatch.setattr(planner, "place", lambda *args, **kwargs: RowPlans(((planner.shape_of(row), whole),), whole))
    replica = replica_module.Replica(cfg, torch.device("cpu"), jobs=[row])
    assert not replica.pipe.vae.use_tiling
    replica._clock = SimpleNamespace(done=4, steps=4)  # the steps were done: it failed in the decode
    assert replica.step_down(row) == "none with VAE tiling"
    assert replica.placement_for(row).vae_tiling and replica.pipe.vae.use_tiling
    replica._clock = SimpleNamespace(done=2, steps=4)  # in the steps: tiles would not help
    assert replica.step_down(row) == "text_offload"
    # Not out of memory: the next plan, whatever failed.
    replica._clock = SimpleNamespace(done=4, steps=4)
    assert replica.step_down(row, out_of_memory=False) == planner.next_plan_down("text_offload", replica.roles)


def test_a_failure_before_the_pipeline_call_is_not_taken_for_the_last_videos_decode(monkeypatch):
    """A row whose plan switch ran out of memory, after a row whose video was made whole, steps a
    plan down: the finished video's clock no longer says the steps were done."""
    from types import SimpleNamespace

    from batch_runner.replica import replica as replica_module

    cfg = run_config("manifest=unused.csv", "model=tiny")
    row = job(9, 32, 32)
    whole = planner.Placement("none", "whole frames", vae_tiling=False)
    monkeypatch.setattr(planner, "place", lambda *args, **kwargs: RowPlans(((planner.shape_of(row), whole),), whole))
    replica = replica_module.Replica(cfg, torch.device("cpu"), jobs=[row])
    replica._clock = SimpleNamespace(done=4, steps=4)  # the last video's, made whole

    def runs_out(job):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(replica, "prepare", runs_out)
    with pytest.raises(torch.OutOfMemoryError) as failure:
        replica.make(row, {"image": None}, None)
    assert not hasattr(failure.value, "failed_at")  # no stage: the call never started
    assert replica.step_down(row) == "text_offload"


def test_a_caller_that_ran_the_pipeline_itself_says_where_it_failed(monkeypatch):
    """The benchmark calls the pipeline directly (no clock of `make`): it tells step_down whether its
    steps were done, and a whole-frame decode goes to tiles before any plan goes down."""
    from batch_runner.replica import replica as replica_module

    cfg = run_config("manifest=unused.csv", "model=tiny")
    row = job(9, 32, 32)
    whole = planner.Placement("none", "whole frames", vae_tiling=False)
    monkeypatch.setattr(planner, "place", lambda *args, **kwargs: RowPlans(((planner.shape_of(row), whole),), whole))
    replica = replica_module.Replica(cfg, torch.device("cpu"), jobs=[row])
    assert replica._clock is None  # make never ran
    assert replica.step_down(in_decode=True) == "none with VAE tiling" and replica.pipe.vae.use_tiling
    assert replica.step_down(in_decode=True) == "text_offload"  # tiled already: the next plan
