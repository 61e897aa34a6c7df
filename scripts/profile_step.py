"""Where one denoising step's time goes: kernels by kind, for the resident and the streamed plans.

CogVideoX-5B-I2V's transformer with random weights, one forward at the benchmark's shape (guidance
batch 2, 49x480x720: 17,776 tokens). For each variant it times a few forwards and profiles one with
torch.profiler, summing GPU kernel time into attention, matrix multiplies, copies and the rest, so
"what bounds a step" is a measurement rather than a guess. It also times the attention kernels and
the block's matrix multiplies alone at the same shapes.

    python scripts/profile_step.py --parts kernels,attention,resident,streamed --out docs/experiments

writes step_profile.json (one record per measurement). Parts: kernels (attention backends, SDPA
layouts and the block's matrix multiplies alone), attention (cuDNN attention alone, compiled and
between matrix multiplies), gelu (the feed-forward GELU as a cuBLASLt epilogue), resident and
streamed (a whole transformer forward per plan, profiled). The VAE decode, which earlier runs
recorded here as vae-decode, is measured by scripts/profile_decode.py, each variant from a cold
compile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark import (  # noqa: E402
    FIRST_MODEL,
    Target,
    kernel_seconds,
    random_component,
    seconds_per_call,
    transformer_arch,
    transformer_inputs,
)

from batch_runner.families.cogvideox import FAMILY  # noqa: E402
from batch_runner.replica import placement, speed  # noqa: E402
from batch_runner.replica.replica import release_memory  # noqa: E402

ARCH = transformer_arch()
TARGET = Target.of(FIRST_MODEL)  # CogVideoX-5B-I2V's default row: the step this script takes apart
TOKENS, HEADS, HEAD_DIM = TARGET.tokens, ARCH["num_attention_heads"], ARCH["attention_head_dim"]
HIDDEN = HEADS * HEAD_DIM  # the feed-forward is 4x wider


def measure(label: str, transformer: torch.nn.Module, repeats: int = 4) -> dict:
    """Seconds per forward (wall, GPU-synchronised), host time to launch one, and a kernel breakdown."""
    from torch.profiler import ProfilerActivity, profile

    args = transformer_inputs(TARGET, transformer)
    with torch.no_grad():
        for _ in range(2):  # warm-up: compilation, group offloading's first (order-recording) pass
            transformer(**args)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            transformer(**args)
        launched = (time.perf_counter() - t0) / repeats
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / repeats
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            transformer(**args)
            torch.cuda.synchronize()
    kernels, top = kernel_seconds(prof)
    busy = sum(v for k, v in kernels.items() if k != "copy")
    record = {
        "recipe": "step-profile",
        "variant": label,
        "seconds_per_forward": round(seconds, 4),
        "host_seconds_to_launch": round(launched, 4),
        "tflops": round(TARGET.tflop_per_step / seconds, 1),
        "kernel_seconds": {k: round(v, 4) for k, v in sorted(kernels.items())},
        "compute_kernel_seconds": round(busy, 4),
        "gpu_idle_seconds": round(seconds - busy, 4),
        "top_kernels": [{"seconds": round(s, 4), "name": n, "calls": c} for s, n, c in sorted(top, reverse=True)[:12]],
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    if kernels.get("attention"):
        attention = TARGET.attention_tflop_per_step
        record["attention_tflops"] = round(attention / kernels["attention"], 1)
    if kernels.get("matmul"):
        linear = TARGET.tflop_per_step - TARGET.attention_tflop_per_step
        record["matmul_tflops"] = round(linear / kernels["matmul"], 1)
    print(json.dumps({k: v for k, v in record.items() if k != "top_kernels"}), flush=True)
    return record


def attention_operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """q, k, v of one guided step's attention (contiguous, heads first) and its FLOP."""
    q, k, v = (torch.randn(2, HEADS, TOKENS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return q, k, v, 4 * 2 * HEADS * TOKENS * TOKENS * HEAD_DIM


def kernels_alone() -> list[dict]:
    """The attention backends and the block's matrix multiplies at the step's shapes, alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def timed(fn) -> float:
        return seconds_per_call(fn, 10)

    records = []
    q, k, v, flop = attention_operands()
    for name, backend in [
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ]:
        with sdpa_kernel([backend]):
            s = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        records.append({"recipe": "kernel-alone", "kernel": f"sdpa-{name}", "seconds": s, "tflops": flop / s / 1e12})
    # The layouts CogVideoX's fused processor hands to SDPA: heads transposed out of (B, N, H, D),
    # and v a strided view of the fused QKV projection.
    qkv = torch.randn(2, TOKENS, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    layouts = {
        "bnhd-transposed": tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)),
        "fused-qkv-views": tuple(qkv[:, :, i].transpose(1, 2) for i in range(3)),
    }
    for layout, (lq, lk, lv) in layouts.items():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            s = timed(lambda lq=lq, lk=lk, lv=lv: torch.nn.functional.scaled_dot_product_attention(lq, lk, lv))
        records.append(
            {"recipe": "kernel-alone", "kernel": f"sdpa-cudnn-{layout}", "seconds": s, "tflops": flop / s / 1e12}
        )
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        s = timed(lambda: flex(q, k, v))
        records.append({"recipe": "kernel-alone", "kernel": "flex-compiled", "seconds": s, "tflops": flop / s / 1e12})
    except Exception as e:  # a missing kernel is a finding, not a failure
        records.append({"recipe": "kernel-alone", "kernel": "flex-compiled", "error": str(e)[:200]})
    m = 2 * TOKENS
    for name, (kk, nn) in {
        "qkv": (HIDDEN, 3 * HIDDEN),
        "out": (HIDDEN, HIDDEN),
        "ff-up": (HIDDEN, 4 * HIDDEN),
        "ff-down": (4 * HIDDEN, HIDDEN),
    }.items():
        a = torch.randn(m, kk, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(nn, kk, device="cuda", dtype=torch.bfloat16)
        s = timed(lambda a=a, w=w: torch.nn.functional.linear(a, w))
        records.append(
            {"recipe": "kernel-alone", "kernel": f"linear-{name}", "seconds": s, "tflops": 2 * m * kk * nn / s / 1e12}
        )
    for r in records:
        r.update({k: round(v, 5) for k, v in r.items() if isinstance(v, float)})
        print(json.dumps(r), flush=True)
    return records


def attention_in_context() -> list[dict]:
    """cuDNN attention timed alone, compiled, and between the block's matrix multiplies.

    In the model the attention kernel runs slower than alone; this separates tracing (the compiled
    call) from the GPU's state after heavy matrix work (clocks under the power limit).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, flop = attention_operands()
    x = torch.randn(2 * TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(4 * HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16)
    down = torch.randn(HIDDEN, 4 * HIDDEN, device="cuda", dtype=torch.bfloat16)

    def attend(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    compiled = torch.compile(attend, dynamic=False)
    records = []
    for label, fn, with_matmuls in [
        ("alone", attend, False),
        ("compiled", compiled, False),
        ("between-matmuls", attend, True),
    ]:
        times = []
        for _ in range(12):
            if with_matmuls:
                torch.nn.functional.linear(torch.nn.functional.linear(x, up), down)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(q, k, v)
            stop.record()
            if with_matmuls:
                torch.nn.functional.linear(torch.nn.functional.linear(x, up), down)
            times.append((start, stop))
        torch.cuda.synchronize()
        ms = sorted(a.elapsed_time(b) for a, b in times[2:])
        s = ms[len(ms) // 2] / 1000
        records.append(
            {
                "recipe": "attention-context",
                "context": label,
                "seconds": round(s, 5),
                "tflops": round(flop / s / 1e12, 1),
            }
        )
        print(json.dumps(records[-1]), flush=True)
    return records


def gelu_epilogue() -> list[dict]:
    """The feed-forward's up projection + tanh GELU: Inductor's matmul then a fused GELU kernel, against
    cuBLASLt's GELU epilogue (`torch._addmm_activation`), which applies GELU before writing the result."""
    x = torch.randn(2 * TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4 * HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16) / 64
    b = torch.randn(4 * HIDDEN, device="cuda", dtype=torch.bfloat16)

    def unfused(x, w, b):
        return torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh")

    def epilogue(x, w, b):
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)

    records = []
    reference = unfused(x, w, b).float()
    for label, fn in [("inductor", torch.compile(unfused, dynamic=False)), ("cublaslt-epilogue", epilogue)]:
        s = seconds_per_call(lambda fn=fn: fn(x, w, b), 20)
        error = (fn(x, w, b).float() - reference).abs().max().item()
        records.append({"recipe": "gelu-epilogue", "variant": label, "seconds": round(s, 5), "max_abs_diff": error})
        print(json.dumps(records[-1]), flush=True)
    return records


def compile_sub_layers(transformer: torch.nn.Module) -> None:
    """The replica's former way under an offloading hook: each sub-layer compiled on its own."""
    for block in FAMILY.blocks(transformer):
        for child in block.children():
            if any(True for _ in child.parameters()):
                child.compile(dynamic=False)


def compile_blocks(transformer: torch.nn.Module) -> None:
    """The replica's way: each repeated block's forward compiled whole, before any hook wraps it."""
    speed.compile_blocks(FAMILY.blocks(transformer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="kernels,attention,resident,streamed")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "experiments")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    path = args.out / "step_profile.json"

    def save(record: dict) -> None:
        records.append(record | {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__})
        path.write_text(json.dumps(records, indent=2))

    parts = args.parts.split(",")
    standalone = {"kernels": kernels_alone, "attention": attention_in_context, "gelu": gelu_epilogue}
    for part, measure_part in standalone.items():
        if part in parts:
            for r in measure_part():
                save(r)
            release_memory()
    if "resident" not in parts and "streamed" not in parts:
        print(f"wrote {path}")
        return
    transformer = random_component(TARGET, "transformer")
    speed.fuse_qkv(transformer)
    speed.prefer_attention(FAMILY, transformer, "auto", torch.device("cuda"))
    device = torch.device("cuda")
    if "resident" in parts:
        torch._dynamo.reset()
        compile_blocks(transformer)
        save(measure("resident-compiled", transformer))
    if "streamed" in parts:
        variants = {
            "streamed-sub-layers-compiled": compile_sub_layers,
            "streamed-blocks-compiled": compile_blocks,
        }
        for label, compile_fn in variants.items():
            # A fresh copy of the blocks' forwards for each variant: compile_blocks replaces them.
            for block in FAMILY.blocks(transformer):
                block.__dict__.pop("forward", None)
                block._compiled_call_impl = None
                for child in block.children():
                    child._compiled_call_impl = None
            placement.remove_offloading_hooks(transformer)
            torch._dynamo.reset()
            release_memory()
            torch.cuda.reset_peak_memory_stats()
            if label == "streamed-blocks-compiled":
                compile_fn(transformer)  # before the hooks, as the replica does
            placement._stream(transformer, device, "block_level")
            if label == "streamed-sub-layers-compiled":
                compile_fn(transformer)
            save(measure(label, transformer))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
