"""Benchmark: the reference diffusers recipes against batch_runner's plans, on one GPU.

CogVideoX-5B-I2V's real architecture with random weights, built on the GPU (time and memory do not
depend on weight values), 49 frames at 720x480, guidance 6 with dynamic CFG, DPM scheduler.

Each measurement warms up (one step and a full decode, which also compiles), then times
`--steps` denoising steps with CUDA events and the whole call around them. Seconds per video at
50 steps = (the call's time outside the steps) + 50 x (median step time): the steps are timed
directly, the 50-step figure is extrapolated from them.

    python scripts/benchmark.py --parts refs,plans,approx,e2e --out docs

writes docs/benchmarks.json (one record per measurement, with the model, its row's frames, tokens and
FLOPs per step) and docs/benchmarks.md (the table, written by scripts/bench_report.py, which needs no
GPU). Parts can be run in separate invocations (--append) and merged into one table with --report.

The fast presets (`--model wan2.1-i2v-14b-480p-lightx2v`, `ltx-video-13b-0.9.7-distilled`, ...) are
measured at their own steps and guidance. A preset's LoRAs become random files in the published
key format and rank (the family's `published_lora`), so that our plans time diffusers' conversion
and the fusing, and the reference runs the model card's recipe: `load_lora_weights` on the plain
pipeline, unfused. A distilled checkpoint is its architecture with random weights. Every record
names the preset as `model` and splits the video into stages (`text_encode_s`, `image_encode_s`,
`denoise_s`, `decode_s`).

    python scripts/benchmark.py --model wan2.1-i2v-14b-480p-lightx2v --parts refs,plans,e2e --refs ref-gpu --append
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_report import FIRST_MODEL, REFERENCE_NAMES, load_model_config, write_report  # noqa: E402

from batch_runner import upstream  # noqa: E402
from batch_runner.config import MemoryConfig, ModelConfig, RunConfig, SpeedConfig  # noqa: E402
from batch_runner.families import family_of  # noqa: E402
from batch_runner.families.base import DENOISER  # noqa: E402
from batch_runner.inputs.images import load_image  # noqa: E402
from batch_runner.inputs.manifest import Job  # noqa: E402
from batch_runner.replica import fa4, placement  # noqa: E402
from batch_runner.replica.anatomy import anatomy  # noqa: E402
from batch_runner.replica.lora import resolve  # noqa: E402
from batch_runner.replica.pipeline import build_pipeline, random_pipeline  # noqa: E402
from batch_runner.replica.replica import Replica, out_of_memory_summary, release_memory, stage_reached  # noqa: E402
from batch_runner.run.warm import DISABLE_ENV as WARM_ENV  # noqa: E402
from batch_runner.run.warm import SOCKET_ENV as WARM_SOCKET  # noqa: E402
from batch_runner.run.warm.server import NOT_AHEAD, READY  # noqa: E402

GIB = 1024**3
PROMPT = "Gentle waves roll onto an empty beach at dusk, the sky slowly darkening as the tide foams."


@dataclass(frozen=True)
class Target:
    """The model measured (--model) at its default row, and the size of one of its denoising steps.

    Every measurement of one invocation shares it; records store its FLOPs and tokens, so the report
    never recomputes them. Tokens, width and blocks come from the family's geometry and the model's
    anatomy (batch_runner.replica.anatomy), not from any one model's constants.
    """

    model: str
    config: ModelConfig  # random weights, the row's steps
    options: dict  # what --option set over the model's options (the command line of e2e repeats it)
    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    latent: tuple[int, int, int]  # latent frames, height, width: the VAE's compression of the row
    tokens: int  # transformer tokens of one sequence
    tflop_per_step: float  # one step, both guidance branches where the row is guided
    attention_tflop_per_step: float

    @classmethod
    def of(cls, name: str, loras: Path | None = None, options: dict | None = None) -> Target:
        """`name` (a config of conf/model) at its default row: frames, size, steps and guidance from its config.
        Its LoRAs, if any, become random files of the published format written into `loras` (random_loras).
        `options` are set over its `model.options` (a family's option that needs a download, turned off)."""
        config = load_model_config(name)
        # Random weights of the real architecture; a tiny twin keeps its own (the CPU tests' case).
        options = options or {}
        config = replace(
            config, weights="tiny" if config.weights == "tiny" else "random", options={**config.options, **options}
        )
        if config.loras:
            config = random_loras(config, loras or Path(tempfile.mkdtemp(prefix="batch_runner_loras_")))
        shape = anatomy(config)
        geometry = shape.geometry
        frames, height, width = config.num_frames, config.height, config.width
        tokens = geometry.tokens(frames, height, width, config.max_sequence_length)
        # Per layer and sample: linear layers 24*N*d^2, attention 4*N^2*d. For families that keep
        # the text out of the sequence, cross-attention to it (a few percent) is left out. A
        # two-expert model runs one expert per step.
        d, layers, batch = geometry.hidden, shape.blocks, 2 if config.guided else 1
        attention = 4 * tokens * tokens * d * layers * batch / 1e12
        return cls(
            model=name,
            config=config,
            options=options,
            frames=frames,
            height=height,
            width=width,
            steps=config.num_inference_steps,
            guidance=config.guidance_scale,
            latent=((frames - 1) // geometry.temporal + 1, height // geometry.spatial, width // geometry.spatial),
            tokens=tokens,
            tflop_per_step=attention + 24 * tokens * d * d * layers * batch / 1e12,
            attention_tflop_per_step=attention,
        )

    def model_config(self, steps: int | None = None) -> ModelConfig:
        return replace(self.config, num_inference_steps=steps or self.steps)

    def job(self, i: int, steps: int) -> Job:
        """The benchmark's row `i`: the model's default row with its own prompt and seed."""
        return Job(
            index=i,
            id=f"b{i}",
            image="-",
            prompt=f"{PROMPT} Variation {i}." if i else PROMPT,
            negative_prompt=self.config.negative_prompt,
            seed=i,
            num_frames=self.frames,
            height=self.height,
            width=self.width,
            fps=self.config.fps,
            num_inference_steps=steps,
            guidance_scale=self.guidance,
        )

    def record(self) -> dict:
        """What every record of this target says about it."""
        return {
            "model": self.model,
            "frames": self.frames,
            "tokens": self.tokens,
            "tflop_per_step": round(self.tflop_per_step, 2),
            "attention_tflop_per_step": round(self.attention_tflop_per_step, 2),
        }


def transformer_arch(model: str = FIRST_MODEL) -> dict:
    return json.loads((ROOT / "conf" / "arch" / model / "transformer.json").read_text())


def random_loras(config: ModelConfig, folder: Path) -> ModelConfig:
    """`config` with each LoRA replaced by a file of random values in the key format and rank of the
    published one it names, for the denoiser it goes into: the fusing path (diffusers' conversion of
    that format, then fuse_lora) runs as with the real file, which needs no download."""
    from safetensors.torch import save_file

    family = family_of(config)
    plain = replace(config, loras=[])
    # The tiny model itself, else the architecture's shapes on the meta device (no memory, no time).
    pipe = family.tiny(plain) if config.weights == "tiny" else random_pipeline(plain, torch.bfloat16, "meta")
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for number, entry in enumerate(config.loras):
        component, _ = family.lora_target(config, entry.expert)
        tensors = family.published_lora(config, entry, getattr(pipe, component))
        file = folder / f"{config.name}-{number}-{component}.safetensors"
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(file))
        entries.append(replace(entry, path=str(file), weight_name=None))
    return replace(config, loras=entries)


def load_adapters(pipe, config: ModelConfig) -> list[str]:
    """The model cards' diffusers recipe for a LoRA: `load_lora_weights` into the plain pipeline,
    each as an adapter at its scale, left unfused (every step runs the LoRA layers)."""
    names, scales = [], []
    for number, lora in enumerate(resolve(config)):
        names.append(f"lora_{number}")
        scales.append(float(lora.entry.scale))
        pipe.load_lora_weights(str(lora.file), adapter_name=names[-1], **lora.load_arguments)
    if any(scale != 1.0 for scale in scales):
        pipe.set_adapters(names, adapter_weights=scales)
    return names


def lora_overrides(config: ModelConfig) -> list[str]:
    """The command-line form of `config`'s LoRAs (`'model.loras=[{path:...,scale:...}]'`)."""
    if not config.loras:
        return []
    entries = []
    for entry in config.loras:
        fields = [f"path:'{entry.path}'", f"scale:{float(entry.scale)}"]
        fields += [f"weight_name:'{entry.weight_name}'"] if entry.weight_name else []
        fields += [f"expert:{entry.expert}"] if entry.expert else []
        entries.append("{" + ",".join(fields) + "}")
    return [f"model.loras=[{','.join(entries)}]"]


class StageEvents:
    """CUDA events around one pipeline call's stages: the text encoders' calls, the first denoiser
    call (image and VAE encode end there) and, from timed_call, the last step's end (decode starts)."""

    def __init__(self, pipe, config: ModelConfig) -> None:
        roles = family_of(config).components(pipe)
        self.text = [getattr(pipe, n) for n in roles if n.startswith("text_encoder")]
        self.denoisers = [getattr(pipe, n) for n, role in roles.items() if role == DENOISER]
        self.spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.first: torch.cuda.Event | None = None
        self._hooks: list = []
        self._open: torch.cuda.Event | None = None

    @staticmethod
    def _event() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _text_started(self, module, args) -> None:
        self._open = self._event()

    def _text_done(self, module, args, output) -> None:
        if self._open is not None:
            self.spans.append((self._open, self._event()))
            self._open = None

    def _denoiser_called(self, module, args) -> None:
        if self.first is None:
            self.first = self._event()

    def __enter__(self) -> StageEvents:
        for module in self.text:
            self._hooks += [module.register_forward_pre_hook(self._text_started)]
            self._hooks += [module.register_forward_hook(self._text_done)]
        self._hooks += [d.register_forward_pre_hook(self._denoiser_called) for d in self.denoisers]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()

    def split(self, start: torch.cuda.Event, last_step: torch.cuda.Event, stop: torch.cuda.Event) -> dict:
        """Seconds of each stage of the call (after torch.cuda.synchronize)."""
        text = sum(a.elapsed_time(b) for a, b in self.spans) / 1000
        first = self.first or start
        return {
            "text_encode_s": text,
            "image_encode_s": max(0.0, start.elapsed_time(first) / 1000 - text),
            "denoise_s": first.elapsed_time(last_step) / 1000,
            "decode_s": last_step.elapsed_time(stop) / 1000,
        }


def random_component(target: Target, name: str) -> torch.nn.Module:
    """One component of the random-weight pipeline, on the GPU in bf16; the others are freed."""
    pipe = random_pipeline(target.model_config(), torch.bfloat16, "cuda")
    component = getattr(pipe, name)
    del pipe
    release_memory()
    return component


def transformer_inputs(target: Target, transformer: torch.nn.Module) -> dict:
    """One guided step's CogVideoX transformer inputs at the target's video size (batch 2: guidance)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    arch = transformer.config
    frames, height, width = target.latent
    grid = (height // arch.patch_size, width // arch.patch_size)
    rotary = get_3d_rotary_pos_embed(arch.attention_head_dim, ((0, 0), grid), grid, frames, device="cuda")
    return {
        "hidden_states": torch.randn(2, frames, arch.in_channels, height, width, device="cuda", dtype=torch.bfloat16),
        "encoder_hidden_states": torch.randn(
            2, arch.max_text_seq_length, arch.text_embed_dim, device="cuda", dtype=torch.bfloat16
        ),
        "timestep": torch.tensor([999, 999], device="cuda"),
        "image_rotary_emb": rotary,
        "return_dict": False,
    }


# --- measuring ----------------------------------------------------------------------------------------


def seconds_per_call(fn, repeats: int) -> float:
    """Wall seconds per call of `fn` on the GPU, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


class SyncCounter:
    """Counts host synchronisations (torch's sync debug mode warnings) between the first and last step."""

    def __init__(self) -> None:
        self.count = 0
        self.active = False

    def on_warning(self, message, *args, **kwargs) -> None:
        if self.active and "synchroniz" in str(message):
            self.count += 1


def kernel_kind(name: str) -> str:
    """A CUDA kernel's kind, by its name: attention, matmul, copy or other."""
    n = name.lower()
    if any(k in n for k in ("fmha", "flash", "attention", "sdpa", "cudnn_generated")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul")):
        return "matmul"
    if "memcpy" in n or "memset" in n:
        return "copy"
    return "other"


# ATen's templates that wrap the functor naming what an eager kernel does (a copy, a multiply, ...).
_ATEN_WRAPPERS = frozenset(
    [
        "elementwise_kernel",
        "vectorized_elementwise_kernel",
        "unrolled_elementwise_kernel",
        "index_elementwise_kernel",
        "gpu_kernel_impl",
        "gpu_kernel_impl_nocast",
        "gpu_kernel",
        "launch_legacy_kernel",
    ]
)
_ATEN_NOISE = _ATEN_WRAPPERS | {"OpaqueType"}  # and a template argument that says nothing


def kernel_label(name: str, width: int = 90) -> str:
    """A kernel's name cut to `width` characters, ATen's kept readable: its wrapping templates
    (`void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<...`) fill the
    first 90 characters, so what it does (`direct_copy_kernel_cuda`, `MulFunctor`) goes first."""
    if "at::native::" in name:
        words = [
            w.rsplit("::", 1)[-1]
            for w in re.findall(r"at::native::(?:\(anonymous namespace\)::)?((?:\w+::)*\w+)", name)
        ]
        functors = [w for w in dict.fromkeys(words) if w not in _ATEN_NOISE]
        if functors:
            wrapper = next((f" ({w})" for w in words if w in _ATEN_WRAPPERS), "")
            return f"aten {'/'.join(functors)}{wrapper}"[:width]
    return name[:width]


def kernel_seconds(profiler) -> tuple[dict[str, float], list[tuple[float, str, int]]]:
    """A torch.profiler run's GPU kernel seconds by kind (kernel_kind), and (seconds, name, calls)
    per kernel (its name through kernel_label)."""
    from torch.autograd import DeviceType

    kinds: dict[str, float] = {}
    top: list[tuple[float, str, int]] = []
    for event in profiler.key_averages():
        seconds = event.self_device_time_total / 1e6
        if event.device_type != DeviceType.CUDA or seconds <= 0:
            continue
        kind = kernel_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + seconds
        top.append((seconds, kernel_label(event.key), event.count))
    return kinds, top


def step_kernels(call) -> dict:
    """GPU kernel seconds of one denoising step (the second of a two-step call) by kind, the part of
    the step no kernel ran, and the longest kernels: where a step's time goes, beside its timing."""
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CUDA])
    marks: list[float] = []

    def on_step(pipe, i, t, tensors):
        torch.cuda.synchronize()
        marks.append(time.perf_counter())
        (profiler.start if i == 0 else profiler.stop)()
        return tensors

    call(2, on_step)
    kinds, top = kernel_seconds(profiler)
    step = marks[1] - marks[0]
    return {
        "step_s": round(step, 4),
        "by_kind_s": {k: round(v, 4) for k, v in sorted(kinds.items())},
        "no_kernel_s": round(step - sum(kinds.values()), 4),
        "top": [{"s": round(s, 4), "kernel": name, "calls": n} for s, name, n in sorted(top, reverse=True)[:15]],
    }


# The caching allocator's counters (torch.cuda.memory_stats) that tell a thrashing allocator: new
# segments from the driver, segments handed back (each a device-wide synchronisation), allocations
# retried after freeing every cached block, and those free-alls' waits on every stream.
ALLOCATOR_COUNTERS = {
    "cuda_malloc": "num_device_alloc",
    "cuda_free": "num_device_free",
    "alloc_retries": "num_alloc_retries",
    "sync_all_streams": "num_sync_all_streams",
}


def allocator_calls(before: dict, after: dict) -> dict[str, int]:
    """How often each ALLOCATOR_COUNTERS event happened between two torch.cuda.memory_stats()."""
    return {name: after.get(key, 0) - before.get(key, 0) for name, key in ALLOCATOR_COUNTERS.items()}


def timed_call(target: Target, call, steps: int, budget_gib: float | None, pipe=None, profile: bool = False) -> dict:
    """Warm up, then time one call of `steps` steps; returns the measurement, split into stages
    where `pipe` (the pipeline `call` runs) is given, and with `profile` one more step's kernels
    (step_kernels), after the timing."""
    call(2, None)  # 2: some schedulers fail at 1 step (LTX-2's flow-match euler in diffusers 0.42.1)
    torch.cuda.synchronize()
    release_memory()
    torch.cuda.reset_peak_memory_stats()
    ends: list[torch.cuda.Event] = []
    syncs = SyncCounter()

    def on_step(pipe, i, t, tensors):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        ends.append(event)
        syncs.active = 0 <= i < steps - 1  # between the end of step 0 and the end of the last step
        return tensors

    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    original = warnings.showwarning
    warnings.showwarning = syncs.on_warning
    torch.cuda.set_sync_debug_mode("warn")
    stages = StageEvents(pipe, target.config) if pipe is not None else contextlib.nullcontext()
    try:
        with stages:
            torch.cuda.synchronize()
            counters = torch.cuda.memory_stats()
            wall = time.perf_counter()
            start.record()
            call(steps, on_step)
            stop.record()
            torch.cuda.synchronize()
            wall = time.perf_counter() - wall
            allocator = allocator_calls(counters, torch.cuda.memory_stats())
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = original
    step_ms = sorted(ends[i].elapsed_time(ends[i + 1]) for i in range(len(ends) - 1))
    median = step_ms[len(step_ms) // 2] / 1000
    # The first step has no interval of its own: count it at the median.
    outside = wall - sum(step_ms) / 1000 - median
    peak_allocated = torch.cuda.max_memory_allocated() / GIB
    peak_reserved = torch.cuda.max_memory_reserved() / GIB
    # All steps of a video timed (the caches, whose steps differ): the call itself is the video.
    per_video = wall if steps >= target.steps else outside + target.steps * median
    tflop = target.tflop_per_step
    split = stages.split(start, ends[-1], stop) if isinstance(stages, StageEvents) else {}
    if split and steps < target.steps:  # the video's steps, as seconds_per_video counts them
        split["denoise_s"] = target.steps * median
    profiled = {"step_kernels": step_kernels(call)} if profile else {}
    return (
        {k: round(v, 3) for k, v in split.items()}
        | profiled
        | {
            "seconds_per_video": round(per_video, 2),
            "videos_per_hour": round(3600 / per_video, 1),
            "seconds_per_step": round(median, 4),
            "seconds_outside_steps": round(outside, 2),
            "steps_timed": steps,
            "step_times_s": [round(s / 1000, 4) for s in step_ms],
            "peak_allocated_gib": round(peak_allocated, 2),
            "peak_reserved_gib": round(peak_reserved, 2),
            "within_budget": None if budget_gib is None else bool(peak_reserved <= budget_gib + 1e-6),
            "tflops": round(tflop / median, 1),
            "host_syncs_in_loop": syncs.count,
            "allocator_calls": allocator,  # over the timed call
        }
    )


def reference(
    target: Target, name: str, image, steps: int, budget_gib: float | None = None, profile: bool = False
) -> dict:
    """A recipe from diffusers' documentation, applied to a plain pipeline.

    With `budget_gib` the recipe runs under the same allocator cap as the project's budgeted plans,
    which settles whether it fits a card of that size (its peak alone does not: the CUDA context
    and fragmentation need room too).
    """
    if budget_gib is not None:
        torch.cuda.set_per_process_memory_fraction(budget_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
    # The plain pipeline, then the card's recipe for its LoRAs: load_lora_weights, unfused.
    pipe = build_pipeline(replace(target.model_config(), loras=[]), "cuda")
    adapters = load_adapters(pipe, target.model_config())
    if name != "ref-gpu":
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
    if name == "ref-model-offload":
        pipe.to("cpu")
        pipe.enable_model_cpu_offload()
    elif name == "ref-sequential-offload":
        pipe.to("cpu")
        pipe.enable_sequential_cpu_offload()
    release_memory()

    config = target.model_config()
    family = anatomy(config).family

    def call(n, callback):
        # The family's own call for a row, with the texts given as text: the recipe encodes them.
        job = target.job(0, n)
        arguments = family.call_arguments(config, job, {"image": image}, {job.prompt: None, job.negative_prompt: None})
        accepted = inspect.signature(pipe.__call__).parameters
        arguments |= {k: None for k in ("prompt_embeds", "negative_prompt_embeds") if k in accepted}
        return pipe(
            **arguments,
            prompt=job.prompt,
            negative_prompt=job.negative_prompt if job.guided else None,
            generator=torch.Generator("cuda").manual_seed(0),
            output_type="pt",
            callback_on_step_end=callback,
        )

    label = name if budget_gib is None else f"{name}-{budget_gib:g}gib"
    try:
        with torch.no_grad():
            result = timed_call(target, call, steps, budget_gib, pipe, profile)
    except torch.OutOfMemoryError as e:
        if budget_gib is None:
            raise
        result = {"fits_budget": False, "error": f"out of memory under a {budget_gib:g} GiB cap: {str(e)[:120]}"}
    pipe.remove_all_hooks()
    return {
        "recipe": label,
        "description": REFERENCE_NAMES[name]
        + (f" + load_lora_weights ({len(adapters)} LoRA(s), unfused)" if adapters else "")
        + ("" if budget_gib is None else f", capped at {budget_gib:g} GiB"),
        "budget_gib": budget_gib,
        "changes_output": False,
        "plan": None,
    } | result


def project(
    target: Target,
    label: str,
    image,
    steps: int,
    budget: float | None,
    chunk: int,
    profile: bool = False,
    **overrides,
) -> dict:
    """batch_runner's replica: the plan `auto` picks for the budget (or the one given)."""
    speed = SpeedConfig(**{k: v for k, v in overrides.items() if k in SpeedConfig.__dataclass_fields__})
    mem = MemoryConfig(
        budget_gib=budget, **{k: v for k, v in overrides.items() if k in MemoryConfig.__dataclass_fields__}
    )
    cfg = RunConfig(manifest="-", model=target.model_config(), memory=mem, speed=speed)
    torch.cuda.set_per_process_memory_fraction(1.0)
    replica = Replica(cfg, torch.device("cuda"))
    jobs = [replace(target.job(i, steps), prompt=f"{PROMPT} Variation {i}.") for i in range(chunk)]
    replica.encode(jobs)  # warm-up of the text path
    torch.cuda.synchronize()
    replica._cache.clear()
    t0 = time.perf_counter()
    prompts = replica.encode(jobs)
    torch.cuda.synchronize()
    encode_per_video = (time.perf_counter() - t0) / chunk

    # The last call's progress: a failure after its steps was in the decode.
    progress = {"done": 0, "steps": 0, "denoising": False}

    def call(n, callback):
        job = replace(jobs[0], num_inference_steps=n)
        generator = torch.Generator("cuda").manual_seed(0)
        arguments = replica.family.call_arguments(cfg.model, job, {"image": image}, prompts.embeddings)
        progress.update(done=0, steps=n, denoising=False)

        def counted(pipe, i, t, tensors):
            progress["done"] = i + 1
            return callback(pipe, i, t, tensors) if callback else tensors

        hooks = [d.register_forward_pre_hook(lambda *_: progress.update(denoising=True)) for d in replica.denoisers]
        try:
            with replica_inference(replica):
                return replica.pipe(**arguments, generator=generator, output_type="pt", callback_on_step_end=counted)
        finally:
            for hook in hooks:
                hook.remove()

    before = None  # the plan that ran out of memory (the error itself is let go: it holds the call's frames)
    try:
        result = timed_call(target, call, steps, budget, replica.pipe, profile)
    except torch.OutOfMemoryError as e:
        before = replica.plan
        said = out_of_memory_summary(e)
        where = stage_reached(progress["done"], progress["steps"], progress["denoising"])
    if before is not None:
        # As the runner does: a whole-frame decode that failed goes to tiles, anything else one plan
        # down the ladder; then the same measurement, once the handler has let go of the failed call's
        # frames (and the activations they hold).
        release_memory()
        lower = replica.step_down(in_decode=progress["done"] >= progress["steps"])
        if lower is None:  # nothing below: the budget's record is the failure
            raise torch.OutOfMemoryError(f"{before} ran out of memory and no plan is below it")
        prompts = replica.encode(jobs)
        result = timed_call(target, call, steps, budget, replica.pipe, profile)
        result["oom_fallback"] = f"{before} -> {lower}"
        result["oom_at"] = f"{before} ran out of memory {where}" + (f" ({said})" if said else "")
    result["seconds_per_video"] = round(result["seconds_per_video"] + encode_per_video, 2)
    result["videos_per_hour"] = round(3600 / result["seconds_per_video"], 1)
    result["text_encoding_s_per_video"] = round(encode_per_video, 3)
    result["text_encode_s"] = round(encode_per_video, 3)  # outside the call: the replica encodes a chunk at once
    record = {
        "recipe": label,
        "description": f"batch_runner memory=auto -> {replica.plan}"
        + (f", {len(target.config.loras)} LoRA(s) fused" if target.config.loras else ""),
        "plan": replica.plan,
        "plan_reason": replica.placement.reason,
        "vae_tile": replica.placement.vae_tile,
        "vae_tiling": replica.placement.vae_tiling,  # whole-frame decoding where False (the planner's choice)
        "budget_gib": budget,
        "changes_output": bool(cfg.memory.fp8_weights or cfg.speed.cache != "none"),
        "overrides": overrides or None,
        "compile": cfg.speed.compile,
        "attention": replica.attention,  # the kernel the transformer ran on, not the setting
        "fa4_failure": fa4.failure(),
        "attention_setting": cfg.speed.attention,
        "allocator_settings": replica.allocator_settings,  # given with the cap (placement.allocator_settings)
        "replica_build_s": replica.build_seconds,  # its plan, weights and LoRAs, preparation, ...: start-up's parts
    } | result
    placement.remove_offloading(replica.pipe, replica.roles)
    return record


@contextlib.contextmanager
def replica_inference(replica):
    from batch_runner.replica import speed

    with speed.inference(replica.cfg.speed, replica.device):
        yield


STAGE_COLUMNS = (
    "text_encode_seconds",
    "image_encode_seconds",
    "denoise_seconds",
    "decode_seconds",
    "write_seconds",
    "writer_wait_seconds",
)


def end_to_end(rows: int, steps: int, out: Path, photos: Path, target: Target | None = None) -> dict:
    """The command line itself over a manifest of `rows` rows (the target's preset, random weights,
    its random LoRAs): time to first video, steady rate, and the median seconds of each stage."""
    import pandas as pd

    work = Path(tempfile.mkdtemp(prefix="batch_runner_e2e_"))
    images = sorted(photos.resolve().glob("*.png"))  # absolute: the manifest lives in a temporary folder
    manifest = pd.DataFrame(
        {
            "id": [f"row{i}" for i in range(rows)],
            "image": [str(images[i % len(images)]) for i in range(rows)],
            "prompt": [f"{PROMPT} Take {i}." for i in range(rows)],
        }
    )
    manifest.to_csv(work / "jobs.csv", index=False)
    manifest.head(1).assign(id="warm0").to_csv(work / "warm.csv", index=False)

    def command(jobs: str, out: str) -> list[str]:
        return [
            sys.executable,
            str(ROOT / "run.py"),
            f"manifest={work / jobs}",
            *([f"model={target.model}"] if target else []),
            f"model.weights={target.config.weights if target else 'random'}",
            f"model.num_inference_steps={steps}",
            *(lora_overrides(target.config) if target else []),
            *(
                f"model.options.{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, v in (target.options if target else {}).items()
            ),
            f"output_dir={work / out}",
            "overwrite=true",
        ]

    alone = os.environ | {WARM_ENV: "0"}  # no warm server: these start-ups are a fresh process's
    started = time.time()
    subprocess.run(command("jobs.csv", "out"), check=True, cwd=ROOT, env=alone)
    wall = time.time() - started
    cold = startup_seconds(work / "out", started)
    # Start-up again, warm: a one-row run with the compile cache and the files the first one left.
    warm_started = time.time()
    subprocess.run(command("warm.csv", "warm"), check=True, cwd=ROOT, env=alone)
    warm = startup_seconds(work / "warm", warm_started)
    # And forked from a warm server (batch_runner.run.warm): the imports done before the launch.
    manifest.head(1).assign(id="served0").to_csv(work / "served.csv", index=False)
    with warm_server(work / "warm.sock") as (served, server_log):
        served_started = time.time()
        subprocess.run(command("served.csv", "served"), check=True, cwd=ROOT, env=served)
    forked = startup_seconds(work / "served", served_started)
    pid = json.loads((work / "served" / "logs" / "startup-rank00000.json").read_text())["pid"]
    if not any(f"run {pid}:" in line for line in server_log):  # else it ran cold: not what this measures
        raise RuntimeError(f"the warm server did not make the run: {''.join(server_log[-5:])}")
    table = pd.read_parquet(work / "out" / "results.parquet")
    finished = pd.to_datetime(table["finished_at"]).sort_values()
    first = finished.iloc[0].timestamp() - started
    steady = (finished.iloc[-1] - finished.iloc[0]).total_seconds() / max(1, len(finished) - 1)
    ok = table[table["status"] == "ok"]
    stages = {c: round(float(ok[c].median()), 3) for c in STAGE_COLUMNS if c in ok and ok[c].notna().any()}
    shutil.rmtree(work, ignore_errors=True)  # measured: kept only where a run failed, to be looked at
    return {
        "recipe": "runner-end-to-end",
        "description": f"accelerate-free `python run.py` over {rows} rows at {steps} steps (memory=auto, no budget)",
        "median_stage_seconds": stages,
        "budget_gib": None,
        "changes_output": False,
        "rows": rows,
        "steps": steps,
        "ok_rows": int((table["status"] == "ok").sum()),
        "wall_seconds": round(wall, 1),
        "time_to_first_video_s": round(first, 1),
        "steady_seconds_per_video": round(steady, 2),
        "steady_videos_per_hour": round(3600 / steady, 1),
        "startup_seconds": cold,
        "warm_startup_seconds": warm,
        "warm_server_startup_seconds": forked,
        # What the server imported ahead, and what it left to each run (FlashAttention-4, say) and why.
        "warm_server_notes": [
            line.split("warm server: ", 1)[-1].strip() for line in server_log if NOT_AHEAD in line or READY in line
        ],
        "command": " ".join(command("jobs.csv", "out")[1:]),
    }


@contextlib.contextmanager
def warm_server(path: Path) -> Iterator[tuple[dict[str, str], list[str]]]:
    """`python -m batch_runner.run.warm` listening at `path` while the block runs; yields the
    environment its runs take (its own, with the socket named) and its log, whole once the block ends."""
    env = os.environ | {WARM_SOCKET: str(path), WARM_ENV: "1"}
    command = [sys.executable, "-m", "batch_runner.run.warm"]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    ready = threading.Event()

    def read_log() -> None:
        # Read to the end, not only to READY: a server whose stderr pipe is full would block in its
        # log line, and what it says while serving is what explains a run it lost.
        assert server.stderr is not None
        for line in server.stderr:
            log.append(line)
            if READY in line:
                ready.set()
        ready.set()  # it ended: wake the wait below

    reader = threading.Thread(target=read_log, name="warm-server-log", daemon=True)
    reader.start()
    try:
        ready.wait()
        if not any(READY in line for line in log):
            raise RuntimeError(f"the warm server ended before serving: {''.join(log[-3:])}")
        yield env, log
    except BaseException:
        print("".join(log[-20:]), file=sys.stderr)  # the server's side of a run that failed
        raise
    finally:
        server.terminate()
        server.wait()
        reader.join(timeout=10)  # its runs' children may still hold the pipe a moment


def startup_seconds(output_dir: Path, launched: float) -> dict[str, float]:
    """Seconds from the launch of the command to the end of each start-up phase of its rank 0
    (logs/startup-rank00000.json, written by batch_runner.run.startup): `first_step` is the
    issue's "launch to first step"."""
    marks = json.loads((output_dir / "logs" / "startup-rank00000.json").read_text())
    seconds = {k: round(v - launched, 2) for k, v in marks.items() if isinstance(v, float)}
    return seconds | {k: v for k, v in marks.items() if k.endswith("_parts")}  # a phase's parts, in seconds


# --- environment and report -----------------------------------------------------------------------------


def environment() -> dict:
    import diffusers
    import transformers

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    matmul = 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12
    host = torch.empty(2 * GIB, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    h2d = 2 * GIB / (time.perf_counter() - t0) / 1e9
    del a, b, host, device
    release_memory()
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(props.total_memory / GIB, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "measured_bf16_matmul_tflops": round(matmul, 1),
        "measured_pinned_h2d_gb_s": round(h2d, 1),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def assignments(items: Iterable[str]) -> dict:
    """KEY=VALUE items (--overrides, --option) as a dict: true/false as booleans, digits as integers."""
    parsed = {}
    for item in items:
        key, value = item.split("=", 1)
        parsed[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=FIRST_MODEL, help="a config of conf/model, measured at its default row")
    parser.add_argument("--parts", default="refs,plans,approx,e2e")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps timed per measurement (default: all of a preset's 8 or fewer, else 3)",
    )
    parser.add_argument("--budgets", default="none,24,16,12,8")
    parser.add_argument("--refs", default=",".join(REFERENCE_NAMES))
    parser.add_argument("--capped-refs", default="ref-gpu-tiled", help="references to run under a 24 GiB cap")
    parser.add_argument("--approx", default="fp8,pyramid", help="approximations to measure (change outputs)")
    parser.add_argument(
        "--overrides", default="", help="memory/speed fields for the plans, e.g. enforce_budget=false,attention=flash"
    )
    parser.add_argument(
        "--label", default="", help="suffix for the plans' recipe names: --label=-fo (a bare -fo reads as an option)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="add one more step's GPU kernels by kind (step_kernels) to each record"
    )
    parser.add_argument("--chunk", type=int, default=8, help="prompts encoded together by the replica")
    parser.add_argument("--e2e-rows", type=int, default=16)
    parser.add_argument("--e2e-steps", type=int, default=None, help="default: a preset's 8 or fewer, else 5")
    parser.add_argument("--photos", type=Path, default=ROOT / ".device_inputs" / "examples" / "images")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--append", action="store_true", help="add to an existing benchmarks.json")
    parser.add_argument("--report", action="store_true", help="only rewrite benchmarks.md from the json")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        help="KEY=VALUE over the model's options (model.options), e.g. to turn off one that needs a download",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "benchmarks.json"
    records = json.loads(path.read_text()) if (args.append or args.report) and path.exists() else []
    command = "python scripts/benchmark.py " + " ".join(sys.argv[1:])
    if args.report:
        write_report(records, args.out, os.environ.get("BENCHMARK_COMMAND", command))
        return
    target = Target.of(args.model, options=assignments(args.option))
    args.steps = args.steps or (target.steps if target.steps <= 8 else 3)
    env = environment()
    records = [r for r in records if r.get("recipe") != "environment"] + [{"recipe": "environment"} | env]
    image = load_image(sorted(args.photos.glob("*.png"))[0], target.height, target.width, 10**8)
    parts = args.parts.split(",")
    overrides = assignments(filter(None, args.overrides.split(",")))

    # A user's allocator settings (placement.allocator_settings): a record measured under them says so.
    allocator_env = {name: os.environ[name] for name in placement.ALLOCATOR_ENV if name in os.environ}

    def save(record: dict) -> None:
        record = {"gpu": env["gpu"], "command": command} | target.record() | record
        if allocator_env:
            record["allocator_env"] = allocator_env
        records.append(record)
        path.write_text(json.dumps(records, indent=2))
        print(
            json.dumps(
                {
                    k: record.get(k)
                    for k in (
                        "recipe",
                        "budget_gib",
                        "plan",
                        "seconds_per_video",
                        "seconds_per_step",
                        "peak_allocated_gib",
                        "error",
                    )
                }
            ),
            flush=True,
        )

    def attempt(label: str, budget, fn) -> None:
        try:
            save(fn())
        except Exception as e:  # one failed measurement must not lose the others
            save({"recipe": label, "budget_gib": budget, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        # Everything the measurement built is unreachable now: give its memory back before the next.
        torch.cuda.set_per_process_memory_fraction(1.0)
        release_memory()
        # Freed pinned blocks stay in torch's host cache, and the next replica's planner reads the
        # host's MemAvailable without them: LTX-2's 12 GiB plan was refused after its 24 GiB one in
        # the same process (58 GiB available on a 128 GiB host, docs/experiments/2026-12-04e), its
        # 16 GiB one after a failed 12 GiB one (54.7 GiB, docs/experiments/2026-12-05f).
        upstream.empty_host_cache()

    if "refs" in parts:
        for name in args.refs.split(","):
            attempt(name, None, lambda name=name: reference(target, name, image, args.steps, profile=args.profile))
    if "refs-capped" in parts:
        # Which references fit a 24 GiB card: each one that might, run under the same cap as the plans.
        for name in args.capped_refs.split(","):
            attempt(f"{name}-24gib", 24.0, lambda name=name: reference(target, name, image, args.steps, 24.0))
    if "plans" in parts:
        for b in args.budgets.split(","):
            budget = None if b == "none" else float(b)
            label = f"batch_runner-{'nobudget' if budget is None else f'{b}gib'}{args.label}"
            attempt(
                label,
                budget,
                lambda label=label, budget=budget: project(
                    target, label, image, args.steps, budget, args.chunk, args.profile, **overrides
                ),
            )
    approx = args.approx.split(",")
    if "approx" in parts and "fp8" in approx:
        attempt(
            "approx-fp8-8gib",
            8.0,
            lambda: project(target, "approx-fp8-8gib", image, args.steps, 8.0, args.chunk, fp8_weights=True),
        )
    if "approx" in parts and "pyramid" in approx:
        # Pyramid Attention Broadcast skips attention on a timestep schedule: time all 50 steps.
        attempt(
            "approx-pyramid-nobudget",
            None,
            lambda: project(
                target, "approx-pyramid-nobudget", image, target.steps, None, args.chunk, cache="pyramid", compile="off"
            ),
        )
    if "e2e" in parts:
        e2e_steps = args.e2e_steps or (target.steps if target.steps <= 8 else 5)
        attempt("runner-end-to-end", None, lambda: end_to_end(args.e2e_rows, e2e_steps, args.out, args.photos, target))
    write_report(records, args.out, command)


if __name__ == "__main__":
    main()
