"""What every model family tells the runner, and the parts most families share.

The runner, the planner and the speed code hold a `Family` and ask it; none of them names a model
class. A family module (cogvideox.py, wan.py) subclasses `Family`, sets its pipeline class and
activation terms, and overrides what its pipeline does differently: how a row becomes call
arguments, which blocks repeat, how its attention kernel is chosen.

Importing a family imports neither diffusers nor transformers (3-4 s of CPU a process): its rules,
options, geometry and memory terms are plain Python, and what builds, loads or assembles a pipeline
imports the classes it needs when it runs. So a run that refuses a row, a setting or a launch, or
only checks them, never pays for them. `pipeline_class` names its class (`imported`), read on first use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from batch_runner.config import LoraConfig, ModelConfig
from batch_runner.errors import UserError
from batch_runner.families.rules import frame_problem, size_problem
from batch_runner.upstream import DIFFUSERS_VERSIONS, Mirror

ARCH_DIR = Path(__file__).resolve().parent.parent.parent / "conf" / "arch"

# A component's role decides where the memory plans put it.
ENCODER, DENOISER, DECODER = "encoder", "denoiser", "decoder"

# Before options were per family, every run's output salt held these two CogVideoX settings at their
# defaults, whatever its family: the salt keeps them, so that those runs' output folders still resume.
SALTED_BEFORE_OPTIONS: dict[str, Any] = {"timestep_spacing": "trailing", "use_dynamic_cfg": True}


@dataclass(frozen=True)
class NoOptions:
    """The options of a family that has none (model.options must then be empty)."""


@dataclass(frozen=True)
class ActivationTerms:
    """Activation memory of one video, fitted to peaks measured on an H100 (docs/benchmarks.json).

    Denoising: bytes per (token x transformer width x batch element), with the transformer's weights
    on the GPU ("resident") or streamed block by block ("streamed"). Decoding: bytes per output
    pixel per 512 channels of the VAE's widest block, over at most `tiled_pixels` pixels at once
    when the VAE tiles. `guidance_batch`: the batch of one transformer forward under classifier-free
    guidance (2 where the conditional and unconditional passes share a batch, 1 where they run as
    separate forwards, more where a family batches further passes with them). `tile_side`: the VAE's
    own decode tile (pixels a side), and `smaller_tiles`: the sides, largest first, the planner may
    decode with instead when the VAE's own tiles do not fit the budget. The decode's peak grows with
    a tile's side to the power `tile_scaling`: 2 where it grows with the area; more where the
    allocator's slack around a tile's buffers grows faster than they do. `decode_frames`: for a VAE
    that decodes every frame at once (it tiles space only), the frame count `decode_per_pixel` was
    measured at; the decode then grows with the row's frames as well as its area.
    """

    resident: float
    streamed: float
    decode_per_pixel: float
    tiled_pixels: int
    guidance_batch: int = 2
    tile_side: int | None = None
    smaller_tiles: tuple[int, ...] = ()
    tile_scaling: float = 2.0
    decode_frames: int | None = None


@dataclass(frozen=True)
class Geometry:
    """How a video becomes transformer tokens: the VAE's compression and the transformer's patches."""

    spatial: int  # VAE pixels per latent, each side
    temporal: int  # frames per latent frame (after the first)
    patch: int  # latent pixels per token, each side
    patch_t: int  # latent frames per token
    hidden: int  # transformer width (heads x head dim)
    text_in_sequence: bool  # text tokens join the video tokens in self-attention (CogVideoX)
    vae_channels: int  # the VAE's widest block

    def tokens(self, frames: int, height: int, width: int, text_tokens: int) -> int:
        latent_frames = (frames - 1) // self.temporal + 1
        grid = (height // (self.spatial * self.patch)) * (width // (self.spatial * self.patch))
        video = -(-latent_frames // self.patch_t) * grid
        return video + (text_tokens if self.text_in_sequence else 0)


# The decode terms of Wan's VAE (AutoencoderKLWan), for every family that decodes with it at the
# VAE's own tiles or whole frames. Tiled: Wan 2.2 TI2V-5B's peak is 3.1 GiB above the resident
# weights under none, text_offload and group_offload alike (704x1280, its VAE's widest block 1024
# channels): 12700 bytes per pixel. Whole frames grow faster than their area in what the allocator
# reserves: Wan 2.1 720p's whole-frame decode reserved 59.07 GiB on an H200 (lightx2v preset, 52.93
# allocated), 1.8 GiB above the area's estimate, while 480p's 50.14 stayed below it; tile_scaling
# 2.25 covers both (docs/benchmarks.json).
WAN_VAE_DECODE: dict[str, Any] = {"decode_per_pixel": 12700.0, "tiled_pixels": 256 * 256 * 2, "tile_scaling": 2.25}


def wan_vae_geometry(configs: dict[str, dict]) -> Geometry:
    """Tokens of a transformer with Wan's patching over Wan's VAE (AutoencoderKLWan): Wan's own, and
    SkyReels-V2's and Cosmos-Predict2.5's, which are built on them."""
    t, vae = configs["transformer"], configs["vae"]
    patch_t, patch, _ = t["patch_size"]
    return Geometry(
        spatial=vae.get("scale_factor_spatial") or 8,
        temporal=vae.get("scale_factor_temporal") or 4,
        patch=patch,
        patch_t=patch_t,
        hidden=t["num_attention_heads"] * t["attention_head_dim"],
        text_in_sequence=False,
        vae_channels=(vae.get("decoder_base_dim") or vae["base_dim"]) * max(vae["dim_mult"]),
    )


class imported:
    """A class attribute that names a class as "module:Class" and reads as that class, imported the
    first time it is read (from the class or an instance): `pipeline_class = imported("diffusers:X")`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __get__(self, instance: Any, owner: type | None = None) -> type:
        return _import_class(self.path)


@functools.cache
def _import_class(path: str) -> type:
    module, _, name = path.partition(":")
    return library_class(module, name)


def library_class(module: str, name: str) -> type:
    """`module.name`, a class of diffusers or transformers that a family (or a saved model's config)
    names. A library too old to have it is the user's to fix, said in one sentence (exit 2): the
    newer families' pipelines need a diffusers far above the project's lower bound (tested: 0.42.1)."""
    found = getattr(importlib.import_module(module), name, None)
    if found is None:
        library = module.partition(".")[0]
        raise UserError(
            f"{library} {_installed_version(library)} has no {name}, which this model needs; upgrade it "
            f"(pip install -U {library}; batch_runner's models are tested with diffusers {DIFFUSERS_VERSIONS[-1]})."
        )
    return found


def _installed_version(library: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(library)
    except PackageNotFoundError:
        return "(version unknown)"


class Family:
    """One model family: its pipeline, how to build it, its rules, its call and its memory terms."""

    name: ClassVar[str]
    # The pipeline's class, named (`imported`): importing it imports diffusers.
    pipeline_class: ClassVar[imported]
    # Component name -> role, for every component a pipeline of this family may have. A given
    # checkpoint may lack some (Wan 2.2 has no image encoder); `components` says which it has.
    roles: ClassVar[dict[str, str]]
    activations: ClassVar[ActivationTerms]
    # Schedulers by the name model.scheduler uses; "default" keeps the one saved with the model.
    schedulers: ClassVar[dict[str, str]] = {}
    # Whether the scheduler's arithmetic may stay on the host (speed.keep_timesteps_on_host).
    host_timesteps: ClassVar[bool] = False
    # The fewest denoising steps its pipeline can run (a row asking fewer is refused, naming this).
    min_steps: ClassVar[int] = 1
    # The settings only this family reads (model.options), as a frozen dataclass: its fields are the
    # valid keys, their annotations the types a value must have, their defaults what a missing key means.
    Options: ClassVar[type] = NoOptions
    # The upstream internals only this family relies on, which name its own classes (only a family
    # may): checked with batch_runner.upstream's by tests/test_upstream.py.
    mirrors: ClassVar[tuple[Mirror, ...]] = ()
    # The repeated blocks' inputs, by their argument names, whose second dimension is the prompt's
    # token count where that varies from row to row (a text not padded to a fixed length): compiled
    # blocks take it as a dynamic size, one graph for every prompt (speed.SteadyInputs).
    text_length_inputs: ClassVar[tuple[str, ...]] = ()

    # --- options ---

    def option_problems(self, model: ModelConfig) -> list[str]:
        """What is wrong with model.options, one phrase each naming the key and the fix (checks.py)."""
        fields = {f.name: f for f in dataclasses.fields(self.Options)}
        hints = typing.get_type_hints(self.Options)
        problems = []
        for key, value in (model.options or {}).items():
            if key not in fields:
                fix = f"its options are {', '.join(fields)}" if fields else "it has none; leave model.options empty"
                problems.append(f"model.options.{key} is not an option of {model.name} ({self.name}): {fix}")
            elif (reason := _type_problem(value, hints[key])) is not None:
                problems.append(f"model.options.{key}={value!r} {reason}")
        return problems

    def options(self, model: ModelConfig) -> Any:
        """model.options as this family's `Options`, its defaults filling what the config leaves out."""
        if problems := self.option_problems(model):
            raise UserError("; ".join(problems) + ".")
        hints = typing.get_type_hints(self.Options)
        values = {key: _coerce(value, hints[key]) for key, value in (model.options or {}).items()}
        return self.Options(**values)

    def output_options(self, model: ModelConfig) -> dict[str, Any]:
        """The options that change this family's videos, by name: they salt the output (a row made
        with other values is made again) and are recorded with the run. None by default."""
        return {}

    def salted_options(self, model: ModelConfig) -> dict[str, Any]:
        """`output_options` as the output salt holds them (with the settings every earlier run's salt held)."""
        return SALTED_BEFORE_OPTIONS | self.output_options(model)

    # --- building ---

    def tiny(self, model: ModelConfig) -> Any:
        """A pipeline of this family at toy scale, built in code: offline, seconds on a CPU."""
        raise NotImplementedError

    def assemble(self, model: ModelConfig, modules: dict[str, Any], arch: str) -> Any:
        """The pipeline from random-weight modules built from conf/arch/<arch> (benchmarks)."""
        raise NotImplementedError

    def finish(self, model: ModelConfig, pipe: Any) -> Any:
        """What the family sets on its pipeline once built, whatever built it (loaded, random, tiny):
        settings that are not weights (Cosmos' guardrail). Nothing by default."""
        return pipe

    def components(self, pipe: Any) -> dict[str, str]:
        """The weight-holding components this pipeline has, with their roles."""
        return {name: role for name, role in self.roles.items() if getattr(pipe, name, None) is not None}

    @property
    def context_parallel(self) -> bool:
        """Whether diffusers can split this family's videos across GPUs (replica.gpus > 1): every
        denoiser class its pipeline takes has a context-parallel plan (`_cp_plan`)."""
        hints = typing.get_type_hints(self.pipeline_class.__init__)  # resolves `from __future__` annotations
        classes = [
            cls
            for name, role in self.roles.items()
            if role == DENOISER and name in hints
            for cls in (typing.get_args(hints[name]) or (hints[name],))
            if isinstance(cls, type) and cls is not type(None)
        ]
        return bool(classes) and all(getattr(cls, "_cp_plan", None) for cls in classes)

    def arch_components(self, arch: str) -> dict[str, str]:
        """The components an architecture folder describes, with their roles."""
        folder = arch_folder(arch)
        return {name: role for name, role in self.roles.items() if (folder / f"{name}.json").is_file()}

    def make_scheduler(self, model: ModelConfig, saved: Any) -> Any:
        """The scheduler the model config asks for, built from the saved scheduler's config."""
        if model.scheduler == "default":
            return saved
        if model.scheduler not in self.schedulers:
            choices = ", ".join([*self.schedulers, "default"])
            raise UserError(f"model.scheduler={model.scheduler!r} must be one of {choices} for {model.name}.")
        cls = library_class("diffusers", self.schedulers[model.scheduler])
        return cls.from_config(saved.config, **self.scheduler_overrides(model))

    def scheduler_overrides(self, model: ModelConfig) -> dict[str, Any]:
        """What the chosen scheduler is built with besides the saved config: by default
        `model.flow_shift`, under the name the scheduler takes it (UniPC's `flow_shift`,
        flow-matching Euler's `shift`), and nothing where it is not set."""
        if model.flow_shift is None:
            return {}
        unipc = self.schedulers.get(model.scheduler, "").startswith("UniPC")
        return {"flow_shift": model.flow_shift} if unipc else {"shift": model.flow_shift}

    # --- LoRAs (batch_runner.replica.lora) ---

    def lora_target(self, model: ModelConfig, expert: str | None) -> tuple[str, dict[str, Any]]:
        """The denoiser a `model.loras` entry goes into, and the extra `load_lora_weights` arguments
        that put it there. One denoiser by default: `transformer`."""
        if expert not in (None, "transformer"):
            raise UserError(f"model.loras: expert={expert!r} is not a denoiser of {model.name} (it has: transformer).")
        return "transformer", {}

    def tiny_lora(self, model: ModelConfig, name: str) -> dict[str, torch.Tensor]:
        """The tensors of `tiny://NAME`: a LoRA for the tiny model in a published LoRA's key format,
        so that diffusers' conversion of that format runs in the tests."""
        raise UserError(f"model.loras: the {self.name} family has no tiny LoRA {name!r}.")

    def published_lora(
        self, model: ModelConfig, entry: LoraConfig, denoiser: torch.nn.Module
    ) -> dict[str, torch.Tensor]:
        """Random values in the key format and rank of the published LoRA `entry` names, for `denoiser`
        (on the meta device or not): what scripts/benchmark.py fuses with random weights, so that the
        conversion and fusing of that format are timed without downloading it."""
        raise UserError(f"model.loras: the {self.name} family cannot make a stand-in for {entry.path!r}.")

    # --- rows ---

    def takes_last_image(self, model: ModelConfig) -> bool:
        """Whether a row may give a last frame (the manifest's `last_image` column)."""
        return False

    def row_problems(
        self,
        model: ModelConfig,
        frames: int | None,
        height: int | None,
        width: int | None,
        steps: int | None = None,
    ) -> list[tuple[str, str]]:
        """(column, reason) for each rule a row breaks, each reason naming the nearest valid value.

        A value that could not be read (None) is reported elsewhere; the rules it feeds are skipped.
        """
        problems = []
        if frames is not None and (reason := frame_problem(model, frames)):
            problems.append(("num_frames", reason))
        if height is not None and width is not None and (reason := size_problem(model, height, width)):
            problems.append(("height/width", reason))
        if steps is not None and 1 <= steps < self.min_steps:
            reason = f"{model.name} runs at least {self.min_steps} denoising steps, not {steps}; "
            problems.append(("num_inference_steps", reason + f"the nearest valid value is {self.min_steps}"))
        return problems

    def call_arguments(self, model: ModelConfig, job: Any, images: dict[str, Any], embeds: Any) -> dict[str, Any]:
        """The pipeline's keyword arguments for one row (besides generator, output and callback)."""
        guided = job.guided
        return {
            "image": images["image"],
            "prompt_embeds": embeds[job.prompt],
            "negative_prompt_embeds": embeds[job.negative_prompt] if guided else None,
            "height": job.height,
            "width": job.width,
            "num_frames": job.num_frames,
            "num_inference_steps": job.num_inference_steps,
            "guidance_scale": job.guidance_scale,
            "max_sequence_length": model.max_sequence_length,
        }

    def encode_prompts(self, pipe: Any, texts: list[str], model: ModelConfig, dtype: torch.dtype) -> list[torch.Tensor]:
        """One embedding per text, each (1, tokens, dim): cached per text by the replica."""
        embedded, _ = pipe.encode_prompt(
            prompt=texts,
            do_classifier_free_guidance=False,
            max_sequence_length=model.max_sequence_length,
            device=pipe._execution_device,
            dtype=dtype,
        )
        return [e.unsqueeze(0) for e in embedded]

    def higher_precision(self, pipe: Any) -> tuple[str, contextlib.AbstractContextManager] | None:
        """How to redo, once, a row whose frames came out non-finite or constant: (what it changes, a
        context to run the row in), or None where this family has no such remedy.

        By default the VAE decodes in float32: a half-precision decode is where large latents overflow
        to infinities and NaNs. Families whose pipelines cannot take it return None.
        """
        vae = getattr(pipe, "vae", None)
        if vae is None:
            return None
        return "the VAE in float32", _vae_in_float32(vae)

    # --- sound ---

    # Whether this family's videos come with a sound track (`audio_track`); output.audio=false drops it.
    makes_audio: ClassVar[bool] = False

    def audio_skipped(self, pipe: Any) -> contextlib.AbstractContextManager:
        """A context in which the pipeline skips decoding its sound (output.audio=false): nothing to
        skip by default."""
        return contextlib.nullcontext()

    def audio_track(self, pipe: Any, output: Any) -> tuple[torch.Tensor, int] | None:
        """The row's sound from the pipeline's output: a waveform (channels, samples) in [-1, 1] and
        its sample rate; None for a family without sound (the default) or where it was skipped."""
        return None

    # --- structure, for compile, streaming and the planner ---

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        """The transformer's repeated blocks: compiled once and streamed one at a time."""
        raise NotImplementedError

    def geometry(self, configs: dict[str, dict]) -> Geometry:
        """Token geometry from the components' configs (`config_of` of a pipeline or an arch folder)."""
        raise NotImplementedError

    def forward_batch(self, model: ModelConfig, guided: bool) -> int:
        """Samples in one forward of the denoiser for a row (guided: its guidance_scale is above 1),
        which the planner sizes the denoising activations by: `activations.guidance_batch` guided,
        1 without guidance unless the family's options batch further passes."""
        return self.activations.guidance_batch if guided else 1

    def streamline(self, transformer: torch.nn.Module, model: ModelConfig) -> None:
        """Changes to the denoiser that leave its output as it is and only the runner's path takes
        (diffusers' recipes in the benchmarks keep the stock model): none by default."""

    def attention_head_size(self, transformer_config: Mapping[str, Any]) -> int | None:
        """The transformer's attention head size, read from its config: the attention kernels are
        chosen by it (FlashAttention-4 where it was measured faster, batch_runner/replica/fa4.py)."""
        return transformer_config.get("attention_head_dim")

    def prefer_attention(self, transformer: torch.nn.Module, order: list, backend: str) -> None:
        """Make the transformer's attention use the chosen kernel (`order`: SDPA backends, fastest first;
        `backend`: the same choice as a diffusers attention-dispatcher name).

        A dispatcher backend is strict: it has no fallback for a call its kernel cannot take. The
        fused kernels want head sizes that are multiples of 8, so other sizes keep PyTorch's own
        choice (the tiny test models; every released checkpoint has 64 or 128).
        """
        if (self.attention_head_size(transformer.config) or 8) % 8 == 0:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            # diffusers also makes the backend the process-wide default of every processor not set
            # (other models, a benchmark's reference pipeline built next): keep the choice this model's.
            default = _AttentionBackendRegistry.get_active_backend()[0]
            transformer.set_attention_backend(backend)
            _AttentionBackendRegistry.set_active_backend(default)


# --- helpers the family modules share -------------------------------------------------------------


def _allowed(annotation: Any) -> tuple[Any, ...]:
    """The types an option's annotation admits: `float | None` -> (float, None)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(None if a is type(None) else a for a in typing.get_args(annotation))
    return (annotation,)


def _type_problem(value: Any, annotation: Any) -> str | None:
    """None if `value` is a valid value of the annotation, else what it must be instead."""
    allowed = _allowed(annotation)
    for kind in allowed:
        if kind is None and value is None:
            return None
        if kind is bool and isinstance(value, bool):
            return None
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return None
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if kind is str and isinstance(value, str):
            return None
        if typing.get_origin(kind) is typing.Literal and value in typing.get_args(kind):
            return None
    names = []
    for kind in allowed:
        if kind is None:
            names.append("null")
        elif typing.get_origin(kind) is typing.Literal:
            names.append("one of " + ", ".join(map(str, typing.get_args(kind))))
        else:
            names.append({bool: "true or false", float: "a number", int: "an integer", str: "a string"}[kind])
    return "must be " + " or ".join(names)


def _coerce(value: Any, annotation: Any) -> Any:
    """A whole number where the option is a float (Hydra reads `3` as an int) becomes that float."""
    if float in _allowed(annotation) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def arch_folder(arch: str) -> Path:
    folder = ARCH_DIR / arch
    if not folder.is_dir():
        known = ", ".join(sorted(p.name for p in ARCH_DIR.iterdir() if p.is_dir()))
        raise UserError(f"model.arch={arch!r} has no configs in conf/arch (known: {known}).")
    return folder


def arch_json(arch: str, name: str) -> dict:
    """A shipped component config, without our `_comment` keys."""
    data = json.loads((arch_folder(arch) / f"{name}.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_comment")}


def module_from_config(config: dict) -> torch.nn.Module:
    """A diffusers model (`_class_name`) or a transformers model (`architectures`) from its config,
    built with the current default device and dtype. A diffusers class that only a pipeline's own
    module exports (LTX-2's connectors and vocoder) names that module in `_class_module`."""
    if "_class_name" in config:
        cls = library_class(config.get("_class_module", "diffusers"), config["_class_name"])
        return cls.from_config(config)
    import transformers

    cls = library_class("transformers", config["architectures"][0])
    settings = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    module = cls(transformers.AutoConfig.for_model(config["model_type"], **settings))
    return module.eval()


def config_of(module: Any) -> dict:
    """A component's config as a plain dict, for diffusers and transformers models alike."""
    config = module.config
    return dict(config) if not hasattr(config, "to_dict") else config.to_dict()


@contextlib.contextmanager
def _vae_in_float32(vae: Any) -> Iterator[None]:
    """The VAE in float32 for the duration, the floating inputs of its encode and decode cast to
    match (pipelines hand it latents in the denoiser's dtype); then as it was."""
    dtype = vae.dtype

    def in_float32(method: Any) -> Any:
        def up(value: Any) -> Any:
            return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        return lambda *args, **kwargs: method(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    vae.to(torch.float32)
    vae.encode, vae.decode = in_float32(vae.encode), in_float32(vae.decode)
    try:
        yield
    finally:
        del vae.encode, vae.decode  # the instance attributes: the class's methods show through again
        vae.to(dtype)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def local_source(model: ModelConfig) -> tuple[str, bool]:
    """model.path as from_pretrained takes it, and whether it names a local folder.

    Public: families that read a saved folder themselves (HunyuanVideo-1.5's tokenizers) resolve
    model.path exactly as the pipeline loader does."""
    source = model.path
    local = Path(source).expanduser()
    if not looks_local(source):
        return source, False
    if not local.is_dir():
        raise UserError(f"model.path={source!r} is not a folder; point it at a downloaded copy of {model.name}.")
    return str(local), True


def looks_local(source: str) -> bool:
    """Whether a model.path names a folder on this machine rather than a Hub repository."""
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()
