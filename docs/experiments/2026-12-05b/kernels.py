"""SkyReels-V2 540p's kernels outside attention and the matmuls, alone on the GPU (#24): the q/k RMS
norm and rotary written several ways, the FFN's GELU in cuBLASLt's epilogue, FA4 with a strided
value. Run on the GPU: python kernels.py OUT.json

(The script of call 2, reformatted and linted since; the same shapes, variants and timing.)"""

import json
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward

DEVICE = "cuda"
BATCH, TOKENS, HEADS, HEAD_DIM = 2, 51000, 40, 128
WIDTH = HEADS * HEAD_DIM
Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def milliseconds(fn: Callable, *args: object, n: int = 20) -> float:
    """Milliseconds per call, CUDA events around `n` calls after three warm-up calls."""
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def rope_diffusers(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """diffusers 0.42.1's WanAttnProcessor rotary: two slice writes into an empty tensor."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def rope_stack(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).type_as(x)


def tables(freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return cos.repeat_interleave(2, -1), torch.stack([-sin, sin], -1).flatten(-2)


def rope_swap(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """What batch_runner/families/wan_attention.py's `rotate` computes."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x * cos + swapped * signed_sin).type_as(x)


def main(out: str) -> None:
    torch.manual_seed(0)
    results: dict[str, object] = {}
    angles = torch.randn(1, TOKENS, 1, HEAD_DIM // 2, device=DEVICE) * 3
    freqs_cos, freqs_sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    qkv = torch.randn(BATCH, TOKENS, 3 * WIDTH, device=DEVICE, dtype=torch.bfloat16)
    norm_q, norm_k = (
        torch.nn.RMSNorm(WIDTH, eps=1e-6, elementwise_affine=True, device=DEVICE, dtype=torch.bfloat16)
        for _ in range(2)
    )
    with torch.no_grad():
        norm_q.weight.uniform_(0.5, 1.5)
        norm_k.weight.uniform_(0.5, 1.5)

    def normed(qkv: torch.Tensor) -> Tensors:
        q, k, v = qkv.chunk(3, dim=-1)
        return norm_q(q).unflatten(2, (HEADS, -1)), norm_k(k).unflatten(2, (HEADS, -1)), v.unflatten(2, (HEADS, -1))

    def rotated(rope: Callable) -> Callable:
        def variant(qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Tensors:
            q, k, v = normed(qkv)
            return rope(q, a, b), rope(k, a, b), v

        return variant

    def swap_tables_inside(qkv: torch.Tensor, fc: torch.Tensor, fs: torch.Tensor) -> Tensors:
        return rotated(rope_swap)(qkv, *tables(fc, fs))

    def swap_fp32_norm(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> Tensors:
        q, k, v = qkv.chunk(3, dim=-1)

        def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * weight
            return y.unflatten(2, (HEADS, -1))

        return (
            rope_swap(norm(q, norm_q.weight), cos, signed_sin),
            rope_swap(norm(k, norm_k.weight), cos, signed_sin),
            v.unflatten(2, (HEADS, -1)),
        )

    def norm_only(qkv: torch.Tensor, fc: torch.Tensor, fs: torch.Tensor) -> Tensors:
        return normed(qkv)

    with torch.no_grad():
        reference = [t.float() for t in rotated(rope_diffusers)(qkv, freqs_cos, freqs_sin)[:2]]
        cos, signed_sin = tables(freqs_cos, freqs_sin)
        variants = {
            "base": (rotated(rope_diffusers), (freqs_cos, freqs_sin)),
            "stack": (rotated(rope_stack), (freqs_cos, freqs_sin)),
            "swap_in": (swap_tables_inside, (freqs_cos, freqs_sin)),
            "swap_pre": (rotated(rope_swap), (cos, signed_sin)),
            "swap_fp32norm": (swap_fp32_norm, (cos, signed_sin)),
            "norm_only": (norm_only, (freqs_cos, freqs_sin)),
        }
        for name, (fn, tables_in) in variants.items():

            def worst(made: Tensors) -> float:
                return max((o.float() - r).abs().max().item() for o, r in zip(made[:2], reference, strict=True))

            compiled = torch.compile(fn, dynamic=False)
            checked = name != "norm_only"
            results[f"qk_{name}"] = {
                "ms": round(milliseconds(compiled, qkv, *tables_in), 3),
                "max_diff_vs_base_eager": worst(compiled(qkv, *tables_in)) if checked else None,
                "eager_diff": worst(fn(qkv, *tables_in)) if checked else None,
            }
            print(name, results[f"qk_{name}"], flush=True)

        ffn = FeedForward(WIDTH, inner_dim=13824, activation_fn="gelu-approximate").to(DEVICE, torch.bfloat16).eval()
        x = torch.randn(BATCH, TOKENS, WIDTH, device=DEVICE, dtype=torch.bfloat16)
        up = ffn.net[0].proj

        def up_epilogue(x: torch.Tensor) -> torch.Tensor:
            return torch._addmm_activation(up.bias, x.flatten(0, 1), up.weight.t(), use_gelu=True)

        def ffn_epilogue(x: torch.Tensor) -> torch.Tensor:
            return ffn.net[2](up_epilogue(x)).unflatten(0, x.shape[:2])

        def up_gelu(x: torch.Tensor) -> torch.Tensor:
            return F.gelu(up(x), approximate="tanh")

        stock = ffn(x).float()
        for name, fn in {
            "ffn_base": ffn,
            "ffn_epilogue": ffn_epilogue,
            "up_gelu": up_gelu,
            "up_epilogue": up_epilogue,
            "up_matmul_only": up,
        }.items():
            compiled = torch.compile(fn, dynamic=False)
            made = compiled(x).float() if name.startswith("ffn") else None
            results[name] = {
                "ms": round(milliseconds(compiled, x), 3),
                "max_diff": None if made is None else (made - stock).abs().max().item(),
                "rel": None if made is None else ((made - stock).norm() / stock.norm()).item(),
            }
            print(name, results[name], flush=True)
        ffn32 = FeedForward(WIDTH, inner_dim=13824, activation_fn="gelu-approximate").to(DEVICE).eval()
        ffn32.load_state_dict({k: v.float() for k, v in ffn.state_dict().items()})
        exact = ffn32(x.float())
        results["ffn_noise"] = {
            "base_vs_fp32_rel": ((stock - exact).norm() / exact.norm()).item(),
            "epilogue_vs_fp32_rel": ((ffn_epilogue(x).float() - exact).norm() / exact.norm()).item(),
        }
        del ffn32, exact

        from flash_attn.cute import flash_attn_func

        q, k, v = (t.unflatten(2, (HEADS, -1)) for t in qkv.chunk(3, -1))
        q, k = q.contiguous(), k.contiguous()

        def fa4(value: torch.Tensor) -> torch.Tensor:
            out = flash_attn_func(q, k, value, softmax_scale=HEAD_DIM**-0.5)
            return out[0] if isinstance(out, tuple) else out

        results["fa4_strided_v_equal"] = bool(torch.equal(fa4(v.contiguous()), fa4(v)))
        results["fa4_contig_v_ms"] = round(milliseconds(lambda: fa4(v.contiguous()), n=6), 3)
        results["fa4_strided_v_ms"] = round(milliseconds(lambda: fa4(v), n=6), 3)
        results["v_copy_ms"] = round(milliseconds(v.contiguous, n=10), 3)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
