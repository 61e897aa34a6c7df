"""FA4's SM90 forward tile (query rows x key columns per block) at head size 128: the package's own
128x128 against the wider ones its config search (flash_attn/cute/sm90_config_search.py) finds
feasible, and cuDNN's SDPA beside them. Run on the GPU: python fa4_tiles.py OUT [budget_s]

(The script of call 6, reformatted and linted since; the same shapes, tiles and timing.)"""

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flash_attn.cute.interface import _flash_attn_fwd  # flash-attn-4 4.0.0b36: the only entry with tile_mn
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"skyreels540": 51000, "wan480": 32760}  # tokens; 40 heads of 128
TILES = [None, (128, 176), (128, 192), (128, 160), (128, 144)]  # None: the package's choice (128x128)


def timed(fn: Callable[[], torch.Tensor], iters: int = 8) -> float:
    """Seconds per call, CUDA events around `iters` calls after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def fa4_at(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: tuple[int, int] | None
) -> Callable[[], torch.Tensor]:
    return lambda: _flash_attn_fwd(q, k, v, softmax_scale=128**-0.5, tile_mn=tile)[0]


def main() -> None:
    began, out = time.time(), Path(sys.argv[1])
    budget = float(sys.argv[2]) if len(sys.argv) > 2 else 170
    records = []
    for name, n in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, n, 40, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        flop = 4 * n * n * 128 * 40
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            s = timed(lambda qt=qt, kt=kt, vt=vt: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
        records.append({"shape": name, "tokens": n, "kernel": "sdpa-cudnn", "ms": round(s * 1e3, 2)})
        records[-1]["tflops"] = round(flop / s / 1e12, 1)
        print(json.dumps(records[-1]), flush=True)
        reference = None
        for tile in TILES:
            if time.time() - began > budget:
                print("out of time", flush=True)
                break
            compile_started = time.time()
            try:
                fn = fa4_at(q, k, v, tile)
                output = fn()
                torch.cuda.synchronize()
                compile_s = time.time() - compile_started
                s = timed(fn)
                diff = 0.0 if reference is None else (output.float() - reference.float()).abs().max().item()
                reference = output if reference is None else reference
                record = {
                    "shape": name,
                    "tokens": n,
                    "kernel": "fa4",
                    "tile": tile or "default(128x128)",
                    "ms": round(s * 1e3, 2),
                    "tflops": round(flop / s / 1e12, 1),
                    "max_abs_diff_vs_default": diff,
                    "compile_s": round(compile_s, 1),
                }
            except Exception as e:
                record = {"shape": name, "kernel": "fa4", "tile": tile, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            records.append(record)
            print(json.dumps(record), flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "records": records}
    (out / "tiles.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
