"""How fast the VAE decodes one video, eager and compiled, and what compiling it costs.

CogVideoX-5B-I2V's VAE with random weights on the GPU, one 49x480x720 video (13x60x90 latents),
tiled as the plans decode it. Each variant runs in a fresh process with an empty inductor cache,
so its first call shows the cold compile a run pays once; every process first decodes eagerly, so
the compiled output is compared with the eager one on the same weights and latents.

    python scripts/profile_decode.py --out docs/experiments

writes vae_decode.json (one record per variant). Variants: eager, whole-static (the decoder
compiled for fixed shapes: one graph per tile shape and chunk), whole-dynamic (one graph with
symbolic sizes), resnets-dynamic (each resnet block compiled on its own, symbolic sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

VARIANTS = ("eager", "resnets-dynamic", "whole-dynamic", "whole-static")


def decode_seconds(vae: torch.nn.Module, latents: torch.Tensor) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        frames = vae.decode(latents).sample
    torch.cuda.synchronize()
    return time.perf_counter() - t0, frames


def compile_variant(vae: torch.nn.Module, variant: str) -> None:
    import torch._dynamo
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXResnetBlock3D

    torch._dynamo.config.cache_size_limit = 64
    if variant == "whole-static":
        vae.decoder.forward = torch.compile(vae.decoder.forward, dynamic=False)
    elif variant == "whole-dynamic":
        vae.decoder.forward = torch.compile(vae.decoder.forward, dynamic=True)
    elif variant == "resnets-dynamic":
        for module in vae.decoder.modules():
            if isinstance(module, CogVideoXResnetBlock3D):
                module.forward = torch.compile(module.forward, dynamic=True)


def in_fresh_process(variant: str, timeout: int) -> dict:
    """`measure(variant)` in a child process with an empty inductor cache: its first call is a cold compile."""
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as cache:  # compile workers may outlive a timeout
        env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache}
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--one", variant], env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"variant": variant, "tiled": True, "error": f"over {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RECORD ")]
    return (
        json.loads(lines[-1].removeprefix("RECORD "))
        if lines
        else {"variant": variant, "tiled": True, "error": done.stderr[-600:]}
    )


def measure(variant: str) -> dict:
    from benchmark import FIRST_MODEL, Target, random_component

    target = Target.of(FIRST_MODEL)  # CogVideoX-5B-I2V's default row
    vae = random_component(target, "vae")
    vae.enable_tiling()
    generator = torch.Generator("cuda").manual_seed(0)
    shape = (1, vae.config.latent_channels, *target.latent)
    latents = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=generator)
    decode_seconds(vae, latents)  # cuDNN's first-call set-up
    torch.cuda.reset_peak_memory_stats()
    eager_s, reference = decode_seconds(vae, latents)
    record = {"variant": variant, "tiled": True, "eager_seconds": round(eager_s, 3)}
    if variant != "eager":
        compile_variant(vae, variant)
        first, _ = decode_seconds(vae, latents)
        torch.cuda.reset_peak_memory_stats()
        times = [decode_seconds(vae, latents) for _ in range(3)]
        seconds, frames = min(times, key=lambda t: t[0])
        scale = reference.float().abs().max().item()
        diff = (frames.float() - reference.float()).abs()
        record |= {
            "first_call_seconds": round(first, 1),
            "seconds": round(seconds, 3),
            "max_abs_diff": round(diff.max().item(), 4),
            "mean_abs_diff": round(diff.mean().item(), 5),
            "reference_max_abs": round(scale, 3),
            "graphs": _graph_count(),
        }
    record["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return record


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "experiments")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one variant, in a child process
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args()
    if args.one:
        print("RECORD " + json.dumps(measure(args.one)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "vae_decode.json"
    records: list[dict] = []
    for variant in args.variants.split(","):
        record = in_fresh_process(variant, args.timeout)
        record |= {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
        records.append(record)
        print(json.dumps(record), flush=True)
        path.write_text(json.dumps(records, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
