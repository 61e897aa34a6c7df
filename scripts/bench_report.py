"""The benchmark's report: docs/benchmarks.md, written from the records in docs/benchmarks.json.

Reporting needs no GPU, torch or model: `python scripts/bench_report.py --out docs` regenerates the
markdown from the committed records (tests/test_benchmark_report.py checks that it matches).
scripts/benchmark.py measures, appends records and calls `write_report`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

OVER_SEQUENTIAL_AT_8GIB = 2.5  # the 8 GiB target: this many times faster than sequential offload
REFERENCE_NAMES = {
    "ref-gpu": "pipe.to('cuda')",
    "ref-gpu-tiled": "pipe.to('cuda') + VAE slicing and tiling",
    "ref-model-offload": "enable_model_cpu_offload() + VAE slicing and tiling",
    "ref-sequential-offload": "enable_sequential_cpu_offload() + VAE slicing and tiling (CogVideo's demo)",
}
# The first records, which name no model, are CogVideoX-5B-I2V's at its default row.
FIRST_MODEL = "cogvideox-5b-i2v"
FIRST_FRAMES, FIRST_HEIGHT, FIRST_WIDTH, FIRST_STEPS = 49, 480, 720, 50


# Issue #23's targets for the fast presets, in place of the 1.3x of a 40-50-step model: the ratio to
# the card's diffusers recipe where the issue names one, seconds per video, and the share of a video
# spent outside its denoising steps. A preset listed without a ratio shows its ratio, unjudged.
FAST_PRESETS: dict[str, dict[str, float]] = {
    "wan2.1-i2v-14b-480p-lightx2v": {"ratio": 1.15, "seconds": 14.0, "outside_share": 0.25},
    "wan2.1-i2v-14b-720p-lightx2v": {},
    "wan2.2-i2v-a14b-lightning": {},
    "ltx-video-13b-0.9.7-distilled": {"seconds": 5.0},
    "hunyuanvideo1.5-i2v-480p-step-distilled": {},
    "ltx-2-distilled": {},
}


def footprint(record: dict) -> float:
    """A record's peak reservation, else (a record rebuilt from a log's summary line) its peak allocation."""
    return record.get("peak_reserved_gib") or record["peak_allocated_gib"]


def load_model_config(name: str) -> Any:
    """A model's config from conf/model, as the run composes it (batch_runner's ModelConfig, imported only here)."""
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT))
    from batch_runner.config import ModelConfig

    loaded = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded))


def first_model_step(rows: list[dict]) -> dict:
    """The size of one guided denoising step of the first model: from a record that stored it, else
    computed from its architecture (its records predate records storing their FLOPs and tokens).

    CogVideoX puts its text in the self-attention sequence; its VAE compresses 4x in time and 8x in
    space, and its transformer takes 2x2 patches: 16 pixels per token side.
    """
    arch = json.loads((ROOT / "conf" / "arch" / FIRST_MODEL / "transformer.json").read_text())
    layers, head_dim = arch["num_layers"], arch["attention_head_dim"]
    stored = next((r for r in rows if r.get("tflop_per_step") and r.get("tokens")), None)
    if stored:
        return {"layers": layers, "head_dim": head_dim} | {
            k: stored[k] for k in ("tflop_per_step", "attention_tflop_per_step", "tokens")
        }
    d = arch["num_attention_heads"] * head_dim
    tokens = ((FIRST_FRAMES - 1) // 4 + 1) * (FIRST_HEIGHT // 16) * (FIRST_WIDTH // 16) + arch["max_text_seq_length"]
    attention, linear = 4 * tokens * tokens * d, 24 * tokens * d * d
    return {
        "layers": layers,
        "head_dim": head_dim,
        "tokens": tokens,
        "tflop_per_step": (attention + linear) * layers * 2 / 1e12,
        "attention_tflop_per_step": attention * layers * 2 / 1e12,
    }


def bounds(rows: list[dict], peak: float | None, profile: list[dict]) -> list[str]:
    """What limits the fastest plan, from the step profile (scripts/profile_step.py) where there is one."""
    own = next((r for r in rows if r.get("recipe") == "batch_runner-nobudget" and "seconds_per_step" in r), None)
    if not own or not peak:
        return []
    step = first_model_step(rows)
    layers, attention, total = step["layers"], step["attention_tflop_per_step"], step["tflop_per_step"]
    lines = [
        "",
        "## What bounds a step",
        "",
        f"A step is {total:.0f} TFLOP, {attention:.0f} of them in attention (head size {step['head_dim']}, "
        f"{step['tokens']} tokens, {layers} layers). At this GPU's measured matmul rate ({peak} TFLOP/s) a step "
        f"could not take less than {total / peak:.2f} s. The replica's step takes {own['seconds_per_step']} s "
        f"({own['tflops']} TFLOP/s, {100 * own['tflops'] / peak:.0f}% of that rate).",
    ]

    def last(recipe: str, **match) -> dict | None:
        found = [r for r in profile if r.get("recipe") == recipe and all(r.get(k) == v for k, v in match.items())]
        return found[-1] if found else None

    step = last("step-profile", variant="resident-compiled")
    alone = last("kernel-alone", kernel="sdpa-cudnn")
    between = last("attention-context", context="between-matmuls")
    clocks = last("gpu-clocks-under-load")
    if step and alone and between and clocks:
        k = step["kernel_seconds"]
        floor = layers * alone["seconds"] + k["matmul"]
        outside = own["seconds_outside_steps"]
        lines += [
            "",
            "Where a resident step's time goes (torch.profiler, docs/experiments/step_profile.json): attention "
            f"{k['attention']} s ({step['attention_tflops']} TFLOP/s, cuDNN, the fastest SDPA kernel here; "
            f"FlashAttention-2 and FlexAttention are slower alone), matrix multiplies {k['matmul']} s "
            f"({step['matmul_tflops']} TFLOP/s), everything else {k['other']} s, "
            f"GPU idle {step['gpu_idle_seconds']} s. "
            f"The attention kernel alone runs at {alone['tflops']:.0f} TFLOP/s, but between the block's matrix "
            f"multiplies at {between['tflops']:.0f}: the card sits at its {clocks['power_limit_w']} W limit and its "
            f"clock falls from {clocks['idle_sm_clock_mhz_max']} to a median {clocks['sm_clock_mhz_median']} MHz. "
            f"Even with attention at its best alone and nothing else in the step, a step would take {floor:.2f} s: "
            f"{50 * floor + outside:.1f} s per video with the {outside} s of decoding, above 60 s. The no-budget "
            "targets need a faster attention kernel than PyTorch ships for head size 64 on Hopper (no "
            "FlashAttention-3), FP8 attention, or fewer steps; the last two change outputs.",
        ]
    before = last("step-profile", variant="streamed-sub-layers-compiled", run=1)
    after = last("step-profile", variant="streamed-blocks-compiled", run=2)
    resident = last("step-profile", variant="resident-compiled", run=1)
    lines += [
        "",
        "Streamed plans (group_offload) copy the transformer's weights every step on a second CUDA stream while "
        "the blocks compute, and now cost about 1% over the resident step. Three things made them slower before: "
        "diffusers moved the weights outside the blocks (embeddings, output layers) with blocking copies from "
        "pageable memory before and after every forward, which drained the GPU's queue once per step (0.2 s of "
        "a 1.6 s step); they now stay on the GPU. And under the budget's allocator cap the caching allocator "
        "filled the cap and then freed everything behind a device-wide synchronisation; it now collects unused "
        "blocks above 70% of the cap (docs/experiments/allocator_cap.json), or above the plan's planned need where "
        "that is more (docs/experiments/2026-12-05i). And blocks under the offloading hooks were "
        "compiled one sub-layer at a time; they are now compiled whole, before the hooks wrap them."
        + (
            f" One streamed forward took {before['seconds_per_forward']} s before these fixes and "
            f"{after['seconds_per_forward']} s after; the resident step took {resident['seconds_per_forward']} s "
            "in the same run as the first figure."
            if before and after and resident
            else ""
        ),
        "",
        "So every plan now runs at the resident step's speed, and the targets that compare against slower recipes "
        "are bound by that step too: where a target needs less time per video than the no-budget plan takes, only "
        "a faster step can meet it.",
    ]
    return lines


def unchanged_output_records(rows: list[dict]) -> dict[str, dict]:
    """The timed records that leave outputs unchanged, by recipe: the ones the targets judge."""
    return {r["recipe"]: r for r in rows if r.get("seconds_per_video") and not r.get("changes_output")}


def decode_bounds(rows: list[dict], decode: list[dict], profile: list[dict]) -> list[str]:
    """What the time outside the steps is, and what compiling the VAE decoder would buy at 8 GiB."""
    by = unchanged_output_records(rows)
    own8, seq = by.get("batch_runner-8gib"), by.get("ref-sequential-offload")
    resnets = next((r for r in decode if r.get("variant") == "resnets-dynamic" and "seconds" in r), None)
    if not (own8 and seq and resnets):
        return []
    allowance = seq["seconds_per_video"] / OVER_SEQUENTIAL_AT_8GIB - FIRST_STEPS * own8["seconds_per_step"]
    saving = resnets["eager_seconds"] - resnets["seconds"]
    unfinished = [r for r in decode if r.get("variant", "").startswith("whole-") and "error" in r]
    static = [r for r in profile if r.get("recipe") == "vae-decode" and r.get("variant") == "compiled-decoder"]
    lines = [
        "",
        "## What bounds the time outside the steps",
        "",
        f"Outside its steps a video spends {own8['seconds_outside_steps']} s at 8 GiB, nearly all of it in the "
        f"tiled VAE decode ({resnets['eager_seconds']} s eager; docs/experiments/vae_decode.json, "
        "`python scripts/profile_decode.py`). The 8 GiB target leaves "
        f"{allowance:.2f} s for it after the plan's {FIRST_STEPS} steps "
        f"({FIRST_STEPS * own8['seconds_per_step']:.1f} s). Compiling the decoder's resnet blocks with "
        f"symbolic sizes decodes in {resnets['seconds']} s (max difference {resnets['max_abs_diff']} on values "
        f"up to {resnets['reference_max_abs']}: bf16 rounding), {saving:.2f} s less, after a cold compile of "
        f"{resnets['first_call_seconds']} s per process: it pays for itself only after about "
        f"{resnets['first_call_seconds'] / saving:.0f} videos and still misses the allowance, so it is not built "
        "into the plans.",
    ]
    if unfinished and static:
        eager = [r for r in profile if r.get("recipe") == "vae-decode" and r.get("run") == static[-1].get("run")]
        static_saving = eager[0]["seconds"] - static[-1]["seconds"]
        longest_wait = max(float(r["error"].removeprefix("over ").removesuffix(" s")) for r in unfinished)
        lines[-1] += (
            " Compiling the whole decoder is the one change measured here that would fit the allowance: an "
            f"earlier static compile decoded in {static[-1]['seconds']} s (docs/experiments/step_profile.json; "
            "some tiles fell back to eager at the recompile limit). But its cold compile did not finish within "
            + " or ".join(f"{r['error'].removeprefix('over ')} ({r['variant']})" for r in unfinished)
            + ". A static compile makes one graph per tile shape and frame chunk, and every process of a run "
            "pays for them unless inductor's on-disk cache is warm. It is not built: its full compile time was "
            f"not measured here, and at {static_saving:.2f} s saved per video a process must make more than "
            f"{longest_wait / static_saving:.0f} videos to earn back even {longest_wait:.0f} s of it."
        )
    return lines


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked against this run's records: met or missed, and by how much."""
    by = unchanged_output_records(rows)

    def s(name: str) -> float | None:
        return by.get(name, {}).get("seconds_per_video")

    checks = []
    own, ref = s("batch_runner-nobudget"), s("ref-gpu")
    if own and ref:
        checks.append(("no budget: at most 60 s per video", own <= 60, f"{own} s ({own / 60:.2f}x the target)"))
        checks.append(
            (
                "no budget: at least 1.6x faster than pipe.to('cuda')",
                ref / own >= 1.6,
                f"{ref / own:.2f}x (needs at most {ref / 1.6:.1f} s)",
            )
        )
    capped = {r["recipe"].removesuffix("-24gib"): r for r in rows if r.get("recipe", "").endswith("-24gib")}

    def fits_24(r: dict) -> bool:
        # Run under a 24 GiB cap where measured; else judged by its uncapped peak reservation.
        if r["recipe"] in capped:
            return "error" not in capped[r["recipe"]]
        return footprint(r) <= 24

    fitting = [r for r in by.values() if r["recipe"] in REFERENCE_NAMES and fits_24(r)]
    own24 = s("batch_runner-24gib")
    if fitting and own24:
        best = min(fitting, key=lambda r: r["seconds_per_video"])
        checks.append(
            (
                f"24 GiB: at least 1.6x the best reference that fits 24 GiB ({best['recipe']}, "
                f"{best['peak_reserved_gib']} GiB reserved; "
                + ", ".join(f"{name} out of memory under a 24 GiB cap" for name, r in capped.items() if "error" in r)
                + ")",
                best["seconds_per_video"] / own24 >= 1.6,
                f"{best['seconds_per_video'] / own24:.2f}x (needs at most {best['seconds_per_video'] / 1.6:.1f} s)",
            )
        )
    own12 = s("batch_runner-12gib")
    if own12 and own:
        checks.append(("12 GiB: at most 1.25x the no-budget time", own12 / own <= 1.25, f"{own12 / own:.2f}x"))
    own8, seq = s("batch_runner-8gib"), s("ref-sequential-offload")
    if own8 and seq:
        checks.append(
            (
                f"8 GiB: at least {OVER_SEQUENTIAL_AT_8GIB}x faster than sequential offload",
                seq / own8 >= OVER_SEQUENTIAL_AT_8GIB,
                f"{seq / own8:.2f}x (needs at most {seq / OVER_SEQUENTIAL_AT_8GIB:.1f} s)",
            )
        )
    budgeted = [r for r in rows if r.get("within_budget") is not None]
    if budgeted:
        ok = all(r["within_budget"] for r in budgeted)
        checks.append(
            (
                "peak memory never above the budget",
                ok,
                f"{sum(r['within_budget'] for r in budgeted)} of {len(budgeted)} budgeted measurements within",
            )
        )
    if not checks:
        return []
    out = ["", "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    out += [f"| {name} | {'yes' if met else '**no**'} | {value} |" for name, met, value in checks]
    return out


def experiment_records(out: Path, name: str) -> list[dict]:
    """docs/experiments/<name>.json, or none where that experiment was not run."""
    path = out / "experiments" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else []


def family_section(model: str, rows: list[dict], peak: float | None) -> list[str]:
    """A model's table and its targets: 1.3x the fastest reference that fits each budget, 24 GiB
    within 1.1x of the model's own no-budget time, never above a budget."""
    config = load_model_config(model)
    current = [r for r in rows if not r.get("superseded")]
    ok = [r for r in current if "error" not in r and r.get("recipe") != "runner-end-to-end"]
    lines = [
        "",
        f"## {model}",
        "",
        f"{config.family} family, architecture conf/arch/{config.arch} with random weights, {config.num_frames} frames "
        f"at {config.width}x{config.height}, {config.num_inference_steps} steps, guidance {config.guidance_scale}; "
        "steps timed with CUDA events after a warm-up and extrapolated as above. 'none' is the whole card.",
        "",
        "| recipe | GPU | budget GiB | plan | attention | s/video | s/step | TFLOP/s | % of matmul peak "
        "| peak alloc GiB | peak reserved GiB | within budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        share = f"{100 * r['tflops'] / peak:.0f}%" if peak and r.get("tflops") else ""
        lines.append(
            f"| {r['recipe']} | {card(r)} | {r.get('budget_gib') or 'none'} | {r.get('plan') or '—'} "
            f"| {r.get('attention') or '—'} | {r['seconds_per_video']} | "
            f"{r['seconds_per_step']} | {r['tflops']} | {share} | {r['peak_allocated_gib']} | {r['peak_reserved_gib']} "
            f"| {'' if r.get('within_budget') is None else r['within_budget']} |"
        )
    lines += step_kernel_lines(ok)
    # Targets per kind of card: timings compare only on one (an H200's memory is faster than an H100's).
    for kind in sorted({card(r) for r in current}):
        checks = target_checks(model, *([r for r in group if card(r) == kind] for group in (ok, current, rows)))
        if checks:
            lines += ["", f"Targets for {model} on the {kind}:", "", "| target | met | measured |", "|---|---|---|"]
            verdict = {True: "yes", False: "**no**", None: "—"}
            lines += [f"| {name} | {verdict[met]} | {measured} |" for name, met, measured in checks]
    errors = [r for r in current if "error" in r]
    lines += [f"- failed ({card(r)}): {r['recipe']}: {r['error']}" for r in errors]
    # A record measured after its planned plan ran out of memory: the plan it names is the one below.
    lines += [
        f"- ran out of memory first ({card(r)}): {r['recipe']}: {r['oom_fallback']}"
        + (f"; {r['oom_at']}" if r.get("oom_at") else "")
        for r in current
        if r.get("oom_fallback")
    ]
    lines += [
        f"- superseded: {r['recipe']} ({r.get('seconds_per_video')} s/video): {r['superseded']}"
        for r in rows
        if r.get("superseded")
    ]
    return lines


def target_checks(
    model: str, ok: list[dict], current: list[dict], rows: list[dict]
) -> list[tuple[str, bool | None, str]]:
    """The targets of `model` judged on the records of one kind of card: `ok` the current ones that
    did not fail, `current` those not superseded, `rows` all (name, met or None, measured)."""
    refs = [r for r in ok if r.get("recipe", "").startswith("ref-") and not r.get("budget_gib")]
    # The targets judge the default settings: labelled variants (-fa4, -cudnn, ...) are rows of the table only.
    ours = {r.get("budget_gib"): r for r in ok if re.fullmatch(r"batch_runner-(nobudget|[\d.]+gib)", r["recipe"])}
    checks = []
    preset = FAST_PRESETS.get(model)
    wanted = 1.3 if preset is None else preset.get("ratio")
    for budget, r in ours.items():
        cap = budget if budget is not None else (r.get("gpu_memory_gib") or 80)
        where = f"{budget:g} GiB" if budget else "whole card"
        fitting = [f for f in refs if footprint(f) <= cap and f.get("gpu") == r.get("gpu")]
        if fitting:
            best = min(fitting, key=lambda f: f["seconds_per_video"])
            ratio = best["seconds_per_video"] / r["seconds_per_video"]
            measured = f"{ratio:.2f}x ({r['seconds_per_video']} s vs {best['seconds_per_video']} s)"
            if wanted is None:
                checks.append(
                    (f"{where}: faster than {best['recipe']} (no ratio named for this preset)", None, measured)
                )
                continue
            needs = best["seconds_per_video"] / wanted
            checks.append(
                (
                    f"{where}: at least {wanted:g}x faster than {best['recipe']} "
                    "(fastest measured reference that fits)",
                    ratio >= wanted,
                    measured + ("" if ratio >= wanted else f"; needs at most {needs:.1f} s"),
                )
            )
        else:
            failed = [
                f["recipe"]
                for f in current
                if f.get("error") and f.get("recipe", "").startswith("ref-") and f.get("gpu") == r.get("gpu")
            ]
            why = (
                f"none runs: {', '.join(failed)} failed on the {card(r)} (below), the others need more"
                if failed
                else f"not measured: no reference run on the {card(r)} fits (sequential offload would; not run)"
            )
            faster = f"at least {wanted:g}x faster" if wanted else "faster"
            checks.append((f"{where}: {faster} than the fastest reference that fits", None, why))
    whole = ours.get(None)
    if preset and whole and "seconds" in preset:
        checks.append(
            (
                f"at most {preset['seconds']:g} s per video (whole card, {card(whole)})",
                whole["seconds_per_video"] <= preset["seconds"],
                f"{whole['seconds_per_video']} s",
            )
        )
    if preset and whole and "outside_share" in preset and whole.get("seconds_outside_steps") is not None:
        share = whole["seconds_outside_steps"] / whole["seconds_per_video"]
        checks.append(
            (
                f"at most {preset['outside_share']:.0%} of a video outside its denoising steps",
                share <= preset["outside_share"],
                f"{share:.0%} ({whole['seconds_outside_steps']} s of {whole['seconds_per_video']} s)",
            )
        )
    own24 = ours.get(24.0)
    if own24 and whole:
        ratio = own24["seconds_per_video"] / whole["seconds_per_video"]
        measured = f"{ratio:.2f}x ({own24['seconds_per_video']} s vs {whole['seconds_per_video']} s)"
        checks.append(("24 GiB within 1.1x of the no-budget time", ratio <= 1.1, measured))
    whole_records = [r for r in rows if r.get("recipe") == "batch_runner-nobudget" and "error" not in r]
    checks += end_to_end_checks(current, whole, whole_records)
    budgeted = [r for r in ok if r.get("within_budget") is not None]
    if budgeted:
        within = sum(bool(r["within_budget"]) for r in budgeted)
        checks.append(("peak memory never above the budget", within == len(budgeted), f"{within} of {len(budgeted)}"))
    return checks


def step_kernel_lines(records: list[dict]) -> list[str]:
    """Where a step's time goes, for the records measured with --profile (benchmark.step_kernels)."""
    profiled = [r for r in records if r.get("step_kernels")]
    if not profiled:
        return []
    lines = [
        "",
        "Where one step's time goes (`--profile`: torch.profiler over one more step, after the timing; "
        "seconds of GPU kernels by kind, and the step's time no kernel ran):",
        "",
        "| recipe | GPU | step s | attention | matmul | copy | other | no kernel | longest kernel |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in profiled:
        k = r["step_kernels"]
        kinds = k["by_kind_s"]
        longest = k["top"][0] if k["top"] else {"s": 0, "kernel": "—"}
        lines.append(
            f"| {r['recipe']} | {card(r)} | {k['step_s']} | "
            + " | ".join(str(kinds.get(kind, 0.0)) for kind in ("attention", "matmul", "copy", "other"))
            + f" | {k['no_kernel_s']} | {longest['s']} s `{longest['kernel'][:60]}` |"
        )
    return lines


def end_to_end_checks(
    current: list[dict], whole: dict | None, whole_records: Sequence[dict] = ()
) -> list[tuple[str, bool | None, str]]:
    """Issue #23's command-line targets: its steady rate within 10% of what the benchmark's
    whole-card record predicts at the same steps (the time outside the steps, plus the steps), and
    launch to first step, warm, within 15 s. The prediction comes from the whole-card record of the
    end-to-end run's own code where `whole_records` (superseded ones too) hold one: a later record
    with other settings (an attention kernel installed since) predicts another run."""
    e2e = next((r for r in current if r.get("recipe") == "runner-end-to-end" and "error" not in r), None)
    if e2e is None:
        return []
    checks: list[tuple[str, bool | None, str]] = []
    same = [r for r in whole_records if e2e.get("code") and r.get("code") == e2e.get("code")]
    whole = same[-1] if same else whole
    if whole and whole.get("seconds_outside_steps") is not None and whole.get("gpu") == e2e.get("gpu"):
        predicted = whole["seconds_outside_steps"] + e2e["steps"] * whole["seconds_per_step"]
        ratio = e2e["steady_seconds_per_video"] / predicted
        of = f"; whole-card record of code {whole['code']}" if same else ""
        checks.append(
            (
                f"the command line over {e2e['rows']} rows within 10% of the benchmark's prediction",
                ratio <= 1.1,
                f"{e2e['steady_seconds_per_video']} s/video against {predicted:.2f} s ({ratio:.2f}x{of})",
            )
        )
    warm = (e2e.get("warm_startup_seconds") or {}).get("first_step")
    served = (e2e.get("warm_server_startup_seconds") or {}).get("first_step")
    if warm is not None:
        cold = e2e["startup_seconds"]["first_step"]
        name = "launch to first step, warm, at most 15 s"
        if served is None:
            checks.append((name, warm <= 15, f"{warm} s (cold {cold} s)"))
        else:  # a warm start as a user makes one: cache filled, and forked from a warm server
            detail = f"{served} s forked from a warm server (a fresh process {warm} s; cold {cold} s)"
            checks.append((name, served <= 15, detail))
    return checks


def card(record: dict) -> str:
    """The GPU a record ran on, short: 'H100', 'H200'."""
    name = record.get("gpu") or "?"
    return next((c for c in ("H100", "H200", "A100") if c in name), name)


def is_scaling(record: dict) -> bool:
    """Records of whole multi-process commands (scripts/scaling.py), not of one replica's calls."""
    return record.get("recipe", "").startswith("scaling-")


def is_startup(record: dict) -> bool:
    """Records of one-row start-ups, before and after a change (scripts/startup_ab.sh)."""
    return record.get("recipe") == "startup-ab"


START_UP_PHASES = ("process_start", "interpreter", "imports", "process_group", "replica", "first_step")


def startup_section(rows: list[dict]) -> list[str]:
    """One-row runs of two trees, alternating on one host: where a change moved the start-up."""
    if not rows:
        return []
    lines = [
        "",
        "## Start-up, before and after a change (scripts/startup_ab.sh)",
        "",
        "One process, one row at 2 steps, the two trees alternating on one host, each with its own compile cache "
        "(the cold run fills it). Seconds from the process's start to the end of its first denoising step, and the "
        "phases of that time (as in the table below).",
        "",
        "| model | GPU | code | compile cache | run | process start to first step s | phases s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        phases = ", ".join(f"{p} {r['phases_s'][p]}" for p in START_UP_PHASES if p in r["phases_s"])
        lines.append(
            f"| {r['model']} | {r['gpu']} | {r['side']} ({r['code']}) | {r['compile_cache']} | {r['run']} | "
            f"{r['process_to_first_step_s']} | {phases} |"
        )
    for side in dict.fromkeys(r["side"] for r in rows):
        warm = [r for r in rows if r["side"] == side and r["compile_cache"] == "warm"]
        if warm:
            total = statistics.mean(r["process_to_first_step_s"] for r in warm)
            first = statistics.mean(r["phases_s"]["first_step"] for r in warm)
            lines.append(
                f"\nWarm, {side} ({warm[0]['code']}), mean of {len(warm)}: {total:.1f} s to the first step, "
                f"of which the first step itself {first:.2f} s."
            )
    commands = list(dict.fromkeys(r["command"] for r in rows if r.get("command")))
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in commands]
    return lines


def scaling_section(rows: list[dict]) -> list[str]:
    """The end-to-end runs on several GPUs: throughput, efficiency against 1 GPU, and start-up."""
    if not rows:
        return []
    lines = [
        "",
        "## Several GPUs, end to end (scripts/scaling.py)",
        "",
        "The whole `accelerate launch` command timed from launch to exit, the same rows per GPU on 1 and on N GPUs, "
        "random weights, the example photos. Efficiency = videos/h on N GPUs / (N x videos/h on 1), same budget and "
        "compile-cache state. Start-up is per process, launch to the end of its first denoising step; the phases "
        "are means over the processes: `process_start` is accelerate's launcher until the process exists, "
        "`interpreter` Python's own start, `imports` our imports and the config, `process_group` joining it and CUDA, "
        "`replica` building the pipeline (random weights here), `first_step` the first step with compilation.",
        "",
        "| model | GPU | gpus | per replica | budget GiB | compile cache | rows | wall s | videos/h "
        "| s/video (median row) | efficiency | launch to first step s (max / mean) | phases s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = list(dict.fromkeys(r["note"] for r in rows if r.get("note")))
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('model')} | | {r.get('gpus')} | | | | | failed: {r['error'][:200]} ||||||")
            continue
        first = r.get("launch_to_first_step_s") or {}
        phases = r.get("phases_mean_s") or {}
        shown = ", ".join(f"{p} {phases[p]}" for p in START_UP_PHASES if p in phases)
        lines.append(
            f"| {r['model']} | {r.get('gpu')} | {r['gpus']} | {r.get('gpus_per_replica', 1)} | "
            f"{r.get('budget_gib') or 'none'} | {r.get('compile_cache', '—')} | {r.get('rows')} | "
            f"{r['wall_seconds']} | {r['videos_per_hour']} | {r.get('median_row_seconds', '—')} | "
            f"{r.get('efficiency', '—')} | {first.get('max', '—')} / {first.get('mean', '—')} | {shown} | "
            f"{notes.index(r['note']) + 1 if r.get('note') else ''} |"
        )
    commands = list(dict.fromkeys(r["command"] for r in rows if r.get("command")))
    lines += ["", "Commands (manifest, output_dir and compile cache folder left out):", ""]
    lines += [f"- `{c}`" for c in commands]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"{n}. {note}" for n, note in enumerate(notes, 1)]
    return lines


def write_report(records: list[dict], out: Path, command: str) -> None:
    env = next((r for r in records if r.get("recipe") == "environment"), {})
    measured = [r for r in records if r.get("recipe") != "environment" and not is_scaling(r) and not is_startup(r)]
    rows = [r for r in measured if r.get("model", FIRST_MODEL) == FIRST_MODEL]
    others = list(dict.fromkeys(r["model"] for r in measured if r.get("model", FIRST_MODEL) != FIRST_MODEL))
    peak = env.get("measured_bf16_matmul_tflops")
    lines = [
        "# Benchmarks",
        "",
        f"GPU: {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB), torch {env.get('torch')} (CUDA {env.get('cuda')}), "
        f"diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, Python {env.get('python')}, "
        f"{env.get('date')}. Measured on this GPU: bf16 8192^3 matmul {peak} TFLOP/s, pinned host-to-GPU copy "
        f"{env.get('measured_pinned_h2d_gb_s')} GB/s.",
        "",
        "CogVideoX-5B-I2V architecture with random weights (time and memory do not depend on weight values), "
        f"{FIRST_FRAMES} frames at {FIRST_WIDTH}x{FIRST_HEIGHT}, guidance 6 with dynamic CFG, CogVideoXDPMScheduler. "
        f"Steps are timed directly with CUDA events after a warm-up; seconds per video are extrapolated to "
        f"{FIRST_STEPS} steps: time outside the steps (text encoding, image encoding, VAE decoding) + "
        f"{FIRST_STEPS} x median step. One denoising step is {first_model_step(rows)['tflop_per_step']:.0f} TFLOP.",
        "",
        f"Command: `{command}`",
        "",
        "| recipe | budget GiB | plan | s/video | videos/h | s/step | TFLOP/s | % of matmul peak | peak alloc GiB "
        "| peak reserved GiB | within budget | changes output |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("recipe") == "runner-end-to-end" or "error" in r:
            continue
        share = f"{100 * r['tflops'] / peak:.0f}%" if peak and r.get("tflops") else ""
        lines.append(
            f"| {r['recipe']} | {r.get('budget_gib') or '—'} | {r.get('plan') or '—'} | {r['seconds_per_video']} | "
            f"{r['videos_per_hour']} | {r['seconds_per_step']} | {r['tflops']} | {share} | {r['peak_allocated_gib']} | "
            f"{r['peak_reserved_gib']} | {'' if r.get('within_budget') is None else r['within_budget']} | "
            f"{'yes' if r.get('changes_output') else 'no'} |"
        )
    for r in rows:
        if r.get("recipe") == "runner-end-to-end" and "error" not in r:
            lines += [
                "",
                "## End to end (the command line)",
                "",
                f"{r['description']}: {r['ok_rows']} ok rows, "
                f"time to first video {r['time_to_first_video_s']} s (imports, weights, compilation), steady "
                f"{r['steady_seconds_per_video']} s per video ({r['steady_videos_per_hour']} videos/h) at "
                f"{r['steps']} steps."
                + (
                    f" Launch to first step: {r['startup_seconds']['first_step']} s, then warm (a second run, "
                    f"compile cache filled) {r['warm_startup_seconds']['first_step']} s."
                    if r.get("warm_startup_seconds")
                    else ""
                )
                + (
                    f" Forked from a warm server (`python -m batch_runner.run.warm`): "
                    f"{r['warm_server_startup_seconds']['first_step']} s."
                    if r.get("warm_server_startup_seconds")
                    else ""
                )
                + f" Command: `{r['command']}`",
            ]
    profile, decode = (experiment_records(out, name) for name in ("step_profile", "vae_decode"))
    lines += bounds(rows, peak, profile) + decode_bounds(rows, decode, profile) + targets(rows)
    commands = list(dict.fromkeys(r["command"] for r in rows if r.get("command")))
    lines += ["", "## Commands", "", "The records above came from these invocations, in order:", ""]
    lines += [f"- `{c}`" for c in commands]
    capped = [r for r in rows if r.get("recipe", "").startswith("ref-") and r.get("budget_gib")]
    if capped:
        lines += ["", "## References under a 24 GiB cap", ""]
        lines += [
            f"- {r['recipe']}: "
            + (
                "does not fit (" + r["error"].split(":")[0] + ")"
                if "error" in r
                else f"fits, {r['seconds_per_video']} s per video, {r['peak_reserved_gib']} GiB reserved"
            )
            for r in capped
        ]
    errors = [r for r in rows if "error" in r and r not in capped]
    if errors:
        lines += ["", "## Failed measurements", ""] + [f"- {r['recipe']}: {r['error']}" for r in errors]
    for model in others:
        lines += family_section(model, [r for r in measured if r.get("model") == model], peak)
    lines += startup_section([r for r in records if is_startup(r)])
    lines += scaling_section([r for r in records if is_scaling(r)])
    (out / "benchmarks.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="the folder of benchmarks.json")
    parser.add_argument("--command", default=None, help="the measuring command the report names")
    args = parser.parse_args()
    records = json.loads((args.out / "benchmarks.json").read_text())
    command = args.command or os.environ.get("BENCHMARK_COMMAND") or "python scripts/bench_report.py"
    write_report(records, args.out, command)


if __name__ == "__main__":
    main()
