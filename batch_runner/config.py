"""The run's configuration, declared once as typed dataclasses.

Hydra composes `conf/` (model and memory groups, overrides from the command line) on top of these
schemas, so a misspelt key or a wrong type fails before anything runs. Every other module receives
these objects, never raw dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


def runs_guidance(guidance_scale: float) -> bool:
    """Whether a video at this guidance scale runs classifier-free guidance, as diffusers' pipelines
    decide it (`do_classifier_free_guidance`): above 1 the negative prompt is encoded and the
    unconditional pass runs; at 1 or below neither does."""
    return guidance_scale > 1


@dataclass
class LoraConfig:
    """One LoRA fused into the model's weights before anything else sees them (batch_runner.replica.lora).

    `path`: a LoRA file, a folder holding one, a Hugging Face Hub id, or `tiny://NAME` (a LoRA its
    family writes in code for the tiny test models). `weight_name`: the file inside a folder or repo.
    `expert`: the denoiser it goes into, for models of two (Wan 2.2 A14B: transformer | transformer_2).
    """

    path: str = MISSING
    weight_name: str | None = None
    scale: float = 1.0
    expert: str | None = None


@dataclass
class ModelConfig:
    """Which pipeline to build and the generation defaults its authors recommend.

    The rule fields say what the model can make; rows that ask for anything else are refused with
    the nearest valid value instead of reaching the pipeline.
    """

    name: str = MISSING
    # The model family (batch_runner/families/<family>): one of families.FAMILY_MODULES.
    family: str = "cogvideox"
    # "pretrained": from_pretrained(path); "random": the architecture in conf/arch/<arch> with random
    # weights built on the GPU (benchmarks); "tiny": a small random pipeline built in code (tests).
    weights: str = "pretrained"
    # The model's Hugging Face repository. `path` is it (`${.repo}`) unless set to a downloaded
    # copy's folder; a folder that lacks files is then told what to download into it.
    repo: str = ""
    path: str = ""
    revision: str | None = None
    arch: str | None = None
    dtype: str = "bfloat16"
    # A scheduler the family names (its `schedulers`), or "default" (as saved with the model).
    scheduler: str = "dpm"
    flow_shift: float | None = None  # flow-matching families: the scheduler's shift; null keeps the saved one
    # Settings only this model's family reads, by name (e.g. model.options.<key>=<value>): the
    # family declares them (its `Options`) and refuses any other key or a value of the wrong type.
    options: dict[str, Any] = field(default_factory=dict)
    max_sequence_length: int = 226
    # Row defaults, overridable per row by manifest columns of the same name.
    num_frames: int = 49
    height: int = 480
    width: int = 720
    fps: float = 8.0
    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    negative_prompt: str = ""
    # What the model can make: frames = frame_multiple * N + 1, at most max_frames.
    frame_multiple: int = 8
    max_frames: int = 49
    # Either an explicit list of [height, width] pairs, or the size rules below.
    sizes: list[list[int]] | None = None
    size_multiple: int = 16
    short_side: int | None = None
    min_side: int = 16
    max_long_side: int | None = None
    # LoRAs fused into the weights at start, in order (see LoraConfig).
    loras: list[LoraConfig] = field(default_factory=list)

    @property
    def guided(self) -> bool:
        """Whether the default row runs classifier-free guidance (`runs_guidance`)."""
        return runs_guidance(self.guidance_scale)


@dataclass
class MemoryConfig:
    """How the replica's weights and activations share the GPU (see batch_runner.replica.placement)."""

    plan: str = "auto"
    # GiB this process may use on its GPU; null means what the GPU has free at start.
    budget_gib: float | None = None
    # Cap the CUDA caching allocator at the budget (torch.cuda.set_per_process_memory_fraction),
    # so that a small card can be emulated on a big one and the run never exceeds it.
    enforce_budget: bool = True
    # Host RAM this host may give to all of its ranks together; null means MemAvailable.
    host_budget_gib: float | None = None
    # The processes of a host load the weights once and share that copy in host memory (a memfd):
    # one copy per host instead of one per process, both while loading and for streamed plans.
    share_host_weights: bool = True
    vae_slicing: bool = True
    vae_tiling: bool = True
    # Pixels a side of one tile of the tiled VAE decode; null: the VAE's own, or a smaller one
    # memory=auto picks where the model allows it and the budget needs it.
    vae_tile: int | None = None
    # Store transformer weights in float8 and upcast per layer: halves their memory, changes outputs.
    fp8_weights: bool = False
    # On an out-of-memory error, retry the row once with the next plan down the ladder.
    fallback_on_oom: bool = True


@dataclass
class SpeedConfig:
    """Speed settings that leave outputs unchanged up to bf16 noise, and opt-in approximations."""

    # Regional torch.compile of the repeated transformer blocks: "auto" compiles on CUDA only.
    compile: str = "auto"
    fuse_qkv: bool = True
    # Scaled-dot-product-attention backend: auto | cudnn | fa4 (FlashAttention-4) | flash | efficient | math
    attention: str = "auto"
    # Opt-in step caching that changes outputs: none | first_block | pyramid
    cache: str = "none"
    cache_threshold: float = 0.05
    # Images decoded ahead of the GPU by a background thread.
    prefetch: int = 2
    # Where torch.compile's caches live, reused by a host's processes and by later runs.
    # null: $TORCHINDUCTOR_CACHE_DIR if set, else ~/.cache/batch_runner/inductor
    # (batch_runner/replica/compile_cache.py).
    compile_cache_dir: str | None = None


@dataclass
class ReplicaConfig:
    """How many GPUs make one video together (batch_runner.cluster.parallel).

    `accelerate launch --num_processes N` forms N / gpus replicas; each replica splits every video's
    token sequence across its processes with diffusers' context parallelism, so a video takes
    about 1/gpus of the time (lower latency) and activations about 1/gpus of the memory.
    """

    gpus: int = 1
    # diffusers' context-parallel attention: "ulysses" (all-to-all over heads; needs the head count
    # divisible by gpus) or "ring" (passes keys and values around; needs an attention kernel that
    # returns its log-sum-exp: cuDNN or flash on a GPU).
    attention: str = "ulysses"


@dataclass
class OutputConfig:
    # "videofolder": videos/ + metadata.parquet (always written); "webdataset": also tar shards.
    format: str = "videofolder"
    shard_size: int = 1000
    crf: int = 18
    report: bool = True
    # Whether the videos of a model that makes sound keep it (an AAC track in the same MP4); false drops
    # the track and skips decoding the sound.
    audio: bool = True


@dataclass
class RunConfig:
    manifest: str = MISSING
    # null: outputs/<manifest file name without extension>
    output_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    # Base seed: a row without a seed column gets one derived from this and its id.
    seed: int = 0
    overwrite: bool = False
    # "fail": refuse the whole manifest if any row is invalid; "skip": record them as failed, run the rest.
    on_invalid: str = "fail"
    dry_run: bool = False
    # Only these ids of the manifest (e.g. to regenerate one video).
    ids: list[str] | None = None
    # Start from the config saved in an earlier run's output_dir; command-line overrides still apply.
    from_run: str | None = None
    # "dynamic": processes claim rows as they go; "static": a fixed contiguous split.
    scheduling: str = "dynamic"
    # Most rows claimed (and prompts encoded) at once.
    chunk_size: int = 8
    # Seconds a process may go without progress (a row started or finished, a denoising step) before
    # the others take over its claimed rows (dynamic scheduling; batch_runner/cluster/sharding.py).
    claim_timeout: float = 300.0
    # Input images above this many pixels are refused as decompression bombs.
    max_image_pixels: int = 64_000_000
    log_level: str = "INFO"


def register_configs() -> None:
    """Make the schema available to conf/config.yaml's defaults list as `base_config`."""
    ConfigStore.instance().store(name="base_config", node=RunConfig)
