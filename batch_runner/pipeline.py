"""Building one diffusers pipeline replica from the model config.

Three sources of weights, one pipeline class:
* pretrained: `from_pretrained(model.path)`, a hub id or a local folder, as users run it;
* random: the real architecture from conf/arch/<arch>, random weights created directly on the GPU,
  so that benchmarks need no download (time and memory do not depend on weight values);
* tiny: a few-thousand-parameter pipeline built in code, tokenizer included, for tests and the
  quickstart: deterministic, offline, seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import string
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXTransformer3DModel,
)
from transformers import AutoConfig, T5Config, T5EncoderModel, T5TokenizerFast

from batch_runner.config import ModelConfig
from batch_runner.errors import UserError

log = logging.getLogger(__name__)

ARCH_DIR = Path(__file__).resolve().parent.parent / "conf" / "arch"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"model.dtype={name!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def build_pipeline(
    model: ModelConfig, device: torch.device | str = "cpu", empty: Collection[str] = ()
) -> CogVideoXImageToVideoPipeline:
    """The pipeline with weights where `model.weights` says; on the CPU unless built randomly.

    Components named in `empty` are built on the meta device, without reading or creating any
    weights: another process of the host loads them and this one maps its copy (host_weights).
    The tiny model is always built whole: kilobytes, made in code.
    """
    dtype = torch_dtype(model.dtype)
    if model.weights == "tiny":
        pipe = tiny_pipeline()
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    elif model.weights == "pretrained":
        pipe = load_pretrained(model, dtype, empty)
    elif model.weights == "random":
        pipe = random_pipeline(model, dtype, device, empty)
    else:
        raise UserError(f"model.weights={model.weights!r} must be 'pretrained', 'random' or 'tiny'.")
    pipe.scheduler = make_scheduler(model, pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pretrained(
    model: ModelConfig, dtype: torch.dtype, empty: Collection[str] = ()
) -> CogVideoXImageToVideoPipeline:
    """from_pretrained on a local folder or hub id, failing with one sentence that says what to do."""
    source = model.path
    local = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise UserError(f"model.path={source!r} is not a folder; point it at a downloaded copy of {model.name}.")
    source = str(local) if looks_local else source
    try:
        skeletons = {name: empty_component(source, name, dtype, model.revision) for name in empty}
        return CogVideoXImageToVideoPipeline.from_pretrained(
            source, torch_dtype=dtype, revision=model.revision, **skeletons
        )
    except (OSError, ValueError) as e:
        hint = (
            f"{source!r} does not hold a complete diffusers pipeline (model_index.json and its component folders)"
            if looks_local
            else f"there is no local copy of {source!r} and the Hugging Face Hub could not be reached"
        )
        raise UserError(
            f"Could not load model {model.name!r}: {hint}; download it where there is network "
            f"(`huggingface-cli download {model.path if not looks_local else 'THUDM/CogVideoX-5b-I2V'} "
            f"--local-dir DIR`) and run with model.path=DIR. ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e


def empty_component(source: str, name: str, dtype: torch.dtype, revision: str | None) -> torch.nn.Module:
    """A component of a saved pipeline built from its config alone, on the meta device."""
    library, class_name = CogVideoXImageToVideoPipeline.load_config(source, revision=revision)[name]
    cls = getattr(importlib.import_module(library), class_name)
    with torch.device("meta"), _default_dtype(dtype):
        if hasattr(cls, "load_config"):  # a diffusers model
            return cls.from_config(cls.load_config(source, subfolder=name, revision=revision))
        config = AutoConfig.from_pretrained(source, subfolder=name, revision=revision)
        return cls(config)


def make_scheduler(model: ModelConfig, saved):  # noqa: ANN001, ANN201 - any diffusers scheduler
    """The scheduler the model config asks for, from the saved scheduler's config."""
    if model.scheduler == "default":
        return saved
    classes = {"dpm": CogVideoXDPMScheduler, "ddim": CogVideoXDDIMScheduler}
    if model.scheduler not in classes:
        raise UserError(f"model.scheduler={model.scheduler!r} must be one of dpm, ddim, default.")
    return classes[model.scheduler].from_config(saved.config, timestep_spacing=model.timestep_spacing)


# --- tiny -----------------------------------------------------------------------------------------

TINY_TEXT_DIM = 32


def tiny_tokenizer(max_length: int = 64) -> T5TokenizerFast:
    """A T5 tokenizer over characters and a few words: a real `tokenizers` Unigram model, offline.

    Uppercase and lowercase pieces are both in the vocabulary, so nothing depends on a normalizer
    (which save_pretrained/from_pretrained might not carry over identically).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = [
        "a",
        "the",
        "of",
        "and",
        "to",
        "in",
        "on",
        "with",
        "at",
        "by",
        "is",
        "are",
        "sea",
        "sky",
        "sun",
        "light",
        "night",
        "city",
        "car",
        "tree",
        "water",
    ]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [(f"▁{w}", -1.0) for w in words]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def tiny_pipeline(seed: int = 0) -> CogVideoXImageToVideoPipeline:
    """CogVideoX image-to-video at toy scale: same classes and code paths, random weights."""
    tokenizer = tiny_tokenizer()
    with _seeded(seed):
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=tokenizer.vocab_size,
                d_model=TINY_TEXT_DIM,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
            )
        ).eval()
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=8,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=TINY_TEXT_DIM,
            num_layers=2,
            sample_width=12,
            sample_height=8,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=64,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=True,
        )
        vae = AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
            # Tiles are half the sample size: at this size the tiny model's videos are never tiled
            # (diffusers' tiled encode mis-sizes latents of images smaller than a few tiles).
            sample_height=256,
            sample_width=384,
        )
    scheduler = CogVideoXDDIMScheduler.from_config(_arch_json("cogvideox-5b-i2v", "scheduler"))
    return CogVideoXImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


# --- random (benchmarks) --------------------------------------------------------------------------


def arch_components(arch: str) -> dict[str, dict]:
    """The shipped configs of an architecture: transformer, vae, text_encoder, scheduler."""
    folder = ARCH_DIR / arch
    if not folder.is_dir():
        known = ", ".join(sorted(p.name for p in ARCH_DIR.iterdir() if p.is_dir()))
        raise UserError(f"model.arch={arch!r} has no configs in conf/arch (known: {known}).")
    return {name: _arch_json(arch, name) for name in ("transformer", "vae", "text_encoder", "scheduler")}


def random_pipeline(
    model: ModelConfig, dtype: torch.dtype, device: torch.device | str, empty: Collection[str] = ()
) -> CogVideoXImageToVideoPipeline:
    """The real architecture with random weights, created directly on `device` in `dtype`."""
    if not model.arch:
        raise UserError(f"model.weights=random needs model.arch (a folder of conf/arch) for {model.name!r}.")
    parts = arch_components(model.arch)

    def on(name: str) -> torch.device:
        return torch.device("meta" if name in empty else device)

    with _default_dtype(dtype), _seeded(0):
        with on("transformer"):
            transformer = CogVideoXTransformer3DModel.from_config(parts["transformer"])
        with on("vae"):
            vae = AutoencoderKLCogVideoX.from_config(parts["vae"])
        with on("text_encoder"):
            text_encoder = T5EncoderModel(T5Config(**parts["text_encoder"])).eval()
    scheduler = CogVideoXDDIMScheduler.from_config(parts["scheduler"])
    return CogVideoXImageToVideoPipeline(
        tokenizer=tiny_tokenizer(model.max_sequence_length),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer.to(dtype),
        scheduler=scheduler,
    )


def component_bytes(model: ModelConfig) -> dict[str, int]:
    """Bytes of each component's weights in the run's dtype, without loading any weights.

    Built on the meta device from the shipped architecture (or the tiny pipeline), so dry runs and
    the planner know what a plan costs before anything is read from disk.
    """
    dtype = torch_dtype(model.dtype)
    if model.weights == "tiny" or not model.arch:
        pipe = tiny_pipeline()
        modules = {"text_encoder": pipe.text_encoder, "transformer": pipe.transformer, "vae": pipe.vae}
    else:
        parts = arch_components(model.arch)
        with torch.device("meta"):
            modules = {
                "transformer": CogVideoXTransformer3DModel.from_config(parts["transformer"]),
                "vae": AutoencoderKLCogVideoX.from_config(parts["vae"]),
                "text_encoder": T5EncoderModel(T5Config(**parts["text_encoder"])),
            }
    size = torch.finfo(dtype).bits // 8
    return {name: sum(p.numel() for p in m.parameters()) * size for name, m in modules.items()}


def _arch_json(arch: str, name: str) -> dict:
    data = json.loads((ARCH_DIR / arch / f"{name}.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_comment")}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
