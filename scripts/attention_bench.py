"""FlashAttention-4 against cuDNN's SDPA at the families' real attention shapes, in one run on one GPU.

Each shape is one self-attention call of a family's transformer at its default row (batch 1, bf16,
no mask): heads and head size from conf/arch, tokens from the latent grid. Each kernel is warmed up
(FA4 compiles on first use), then timed with CUDA events; the median of `--repeat` calls gives
TFLOP/s = 4 * B * H * S^2 * D / time (forward only). Accuracy: the largest absolute difference
from cuDNN's output, and each kernel's relative error (||out - ref|| / ||ref||) against a float32
reference over the first `--ref-queries` queries (all keys), on fresh random inputs.

    python scripts/attention_bench.py --out docs/experiments/fa4_attention.json

Also checks the batch_runner custom op (eager and under torch.compile) against the raw kernel.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name, heads, head_dim, tokens, how the tokens are counted
SHAPES = [
    ("cogvideox-5b-i2v 49x480x720", 48, 64, 17_776, "13 x 30 x 45 video + 226 text"),
    ("ltx-video-2b-0.9.5 161x512x768", 32, 64, 8_064, "21 x 16 x 24"),
    ("wan2.1-i2v-14b 480p 81x480x832", 40, 128, 32_760, "21 x 30 x 52"),
    ("hunyuanvideo1.5-i2v 480p 121x480x848", 16, 128, 49_290, "31 x 30 x 53 video (text tokens left out)"),
    ("ltx-video-13b-0.9.7 161x512x768", 32, 128, 8_064, "21 x 16 x 24"),
]


def heads_from_arch(arch: str) -> tuple[int, int]:
    config = json.loads((ROOT / "conf" / "arch" / arch / "transformer.json").read_text())
    return config["num_attention_heads"], config["attention_head_dim"]


def time_ms(fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def measure(name: str, heads: int, dim: int, tokens: int, counted: str, kernel, args: argparse.Namespace) -> dict:
    """One shape: cuDNN, PyTorch's FlashAttention-2 and FA4 on the same random inputs."""
    from batch_runner.replica import fa4

    device = torch.device("cuda")
    torch.manual_seed(0)
    # (batch, tokens, heads, dim): FA4's and diffusers' layout; SDPA gets the (b, h, s, d) view,
    # as diffusers' _native_cudnn hands it after its permute.
    q, k, v = (torch.randn(1, tokens, heads, dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (x.permute(0, 2, 1, 3).contiguous() for x in (q, k, v))
    flops = 4 * heads * tokens * tokens * dim
    record = {"shape": name, "batch": 1, "heads": heads, "head_dim": dim, "tokens": tokens, "tokens_are": counted}

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

    def flash2():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

    ref_out = cudnn().permute(0, 2, 1, 3)
    # float32 reference over the first queries
    n = args.ref_queries
    scores = torch.einsum("bqhd,bkhd->bhqk", q[:, :n].float(), k.float()) * dim**-0.5
    exact = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float())
    del scores

    def rel(out: torch.Tensor) -> float:
        return ((out[:, :n].float() - exact).norm() / exact.norm()).item()

    record["cudnn"] = {"ms": time_ms(cudnn, args.warmup, args.repeat), "rel_err_fp32": rel(ref_out)}
    flash_out = flash2().permute(0, 2, 1, 3)
    record["sdpa_flash2"] = {
        "ms": time_ms(flash2, args.warmup, args.repeat),
        "max_abs_diff_vs_cudnn": (flash_out - ref_out).abs().max().item(),
        "rel_err_fp32": rel(flash_out),
    }
    del flash_out
    if kernel is not None:
        try:
            t0 = time.perf_counter()
            out = kernel(q, k, v)
            out = out[0] if isinstance(out, tuple) else out
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            op_out = fa4.fa4_attention(q, k, v, dim**-0.5)
            record["fa4"] = {
                "ms": time_ms(lambda: kernel(q, k, v), args.warmup, args.repeat),
                "first_call_s": round(first, 2),
                "max_abs_diff_vs_cudnn": (out - ref_out).abs().max().item(),
                "rel_err_fp32": rel(out),
                "custom_op_equals_kernel": bool(torch.equal(op_out, out)),
            }
            del out, op_out
        except Exception as error:  # record why, keep measuring the rest
            record["fa4"] = {"error": f"{type(error).__name__}: {error}"[:2000]}
    for key in ("cudnn", "sdpa_flash2", "fa4"):
        if "ms" in record.get(key, {}):
            record[key]["tflops"] = round(flops / (record[key]["ms"] * 1e-3) / 1e12, 1)
    if "tflops" in record.get("fa4", {}):
        record["fa4_over_cudnn"] = round(record["fa4"]["tflops"] / record["cudnn"]["tflops"], 3)
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "experiments" / "fa4_attention.json")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ref-queries", type=int, default=512)
    parser.add_argument("--shapes", default="", help="comma-separated name prefixes; default all")
    args = parser.parse_args()

    assert heads_from_arch("cogvideox-5b-i2v") == (48, 64) and heads_from_arch("wan2.1-i2v-14b") == (40, 128)
    assert heads_from_arch("ltx-video-0.9.5") == (32, 64) and heads_from_arch("hunyuanvideo1.5-i2v-480p") == (16, 128)

    from batch_runner.replica import fa4

    device = torch.device("cuda")
    kernel = fa4._load()
    reason = fa4.unavailable_reason(device)
    env = {
        "gpu": torch.cuda.get_device_name(device),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        **{
            name: version(name)
            for name in ("flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-cu13", "cuda-bindings")
        },
        "quack-kernels": version("quack-kernels"),
        "apache-tvm-ffi": version("apache-tvm-ffi"),
        "fa4_unavailable": reason,
    }
    print(json.dumps(env), flush=True)
    records = []
    for name, heads, dim, tokens, counted in SHAPES:
        if args.shapes and not any(name.startswith(p) for p in args.shapes.split(",")):
            continue
        record = measure(name, heads, dim, tokens, counted, kernel, args)
        print(json.dumps(record), flush=True)
        records.append(record)
        torch.cuda.empty_cache()

    compiled = None
    if kernel is not None:
        # The custom op inside a compiled function: one opaque call, same numbers as eager.
        q, k, v = (torch.randn(2, 1024, 8, 128, device=device, dtype=torch.bfloat16) for _ in range(3))

        def block(q, k, v):
            return fa4.fa4_attention(q * 1.0, k, v, 128**-0.5) + 1.0

        try:
            compiled_out = torch.compile(block, fullgraph=True)(q, k, v)
            compiled = {"max_abs_diff_vs_eager": (compiled_out - block(q, k, v)).abs().max().item()}
        except Exception as error:
            compiled = {"error": f"{type(error).__name__}: {error}"[:2000]}
        print(json.dumps({"compiled_custom_op": compiled}), flush=True)

    result = {
        "experiment": "fa4-vs-cudnn-attention",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "env": env,
        "method": f"median of {args.repeat} timed calls after {args.warmup} warm-ups, CUDA events; bf16, batch 1, "
        "no mask; TFLOP/s = 4*B*H*S^2*D/time",
        "records": records,
        "compiled_custom_op": compiled,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'shape':40} {'D':>4} {'S':>6} {'cuDNN':>7} {'FA2':>7} {'FA4':>7}  FA4/cuDNN  maxdiff")
    for r in records:
        fa = r.get("fa4", {})
        print(
            f"{r['shape']:40} {r['head_dim']:>4} {r['tokens']:>6} {r['cudnn']['tflops']:>7} "
            f"{r['sdpa_flash2']['tflops']:>7} {fa.get('tflops', 'err'):>7}  {r.get('fa4_over_cudnn', '-')!s:>9}  "
            f"{fa.get('max_abs_diff_vs_cudnn', '-')}"
        )


if __name__ == "__main__":
    main()
