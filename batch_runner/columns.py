"""The names of the columns a manifest gives and the columns the runner writes, owned in one place.

The inputs read a manifest and must keep its columns clear of the runner's names (a manifest column
named `status` would be a second `status` in results.parquet); the outputs write those names. Both
import this module, which sits below them and imports nothing of batch_runner, so neither keeps its
own copy of the other's list.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# A manifest's columns: the two every row needs, then those that override a model default per row.
REQUIRED_COLUMNS = ("image", "prompt")
OVERRIDE_COLUMNS = (
    "last_image",
    "seed",
    "negative_prompt",
    "num_frames",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "fps",
)
KNOWN_COLUMNS = ("id", *REQUIRED_COLUMNS, *OVERRIDE_COLUMNS)

# Where a row's time went: its share of the chunk's text encode, then inside the pipeline call
# image/VAE encode, denoising steps and VAE decode; the video's write (writer thread) and the time
# the GPU waited for the writer before this row's write could be queued.
STAGE_COLUMNS = [
    "text_encode_seconds",
    "image_encode_seconds",
    "denoise_seconds",
    "decode_seconds",
    "write_seconds",
    "writer_wait_seconds",
]


@dataclass(frozen=True)
class ResultColumns:
    """The results table's own columns, in their order, with their types: the fields of one results row.

    batch_runner.outputs.results.ResultRow is this with its constructors; declared here so that the
    list of names the runner writes is read off one declaration.
    """

    id: str
    status: str | None = None  # "ok" / "failed"
    video_path: str | None = None  # relative to output_dir
    seed: int | None = None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    rank: int | None = None
    seconds: float | None = None
    peak_memory_gib: float | None = None
    error: str | None = None
    warnings: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    image: str | None = None
    last_image: str | None = None
    memory_plan: str | None = None
    params_hash: str | None = None
    finished_at: str | None = None
    motion: float | None = None  # mean absolute difference of consecutive frames, 0..1 (outputs/quality.py)
    brightness: float | None = None  # mean pixel value, 0..1
    # Where the row's time went (STAGE_COLUMNS above), seconds.
    text_encode_seconds: float | None = None
    image_encode_seconds: float | None = None
    denoise_seconds: float | None = None
    decode_seconds: float | None = None
    write_seconds: float | None = None
    writer_wait_seconds: float | None = None
    has_audio: bool | None = None  # the MP4 carries a sound track (AAC)
    audio_sample_rate: int | None = None  # its samples per second


# The columns every results table starts with, in this order; the provenance columns and then the
# manifest's passthrough columns follow.
RESULT_COLUMNS = [f.name for f in fields(ResultColumns)]
# What made the videos (batch_runner.outputs.provenance), the same on every row of one run.
PROVENANCE_COLUMNS = [
    "model",
    "model_path",
    "model_repo",
    "model_revision",
    "scheduler",
    "dtype",
    "torch_version",
    "diffusers_version",
    "transformers_version",
    "batch_runner_version",
    "gpu",
    "gpus_per_replica",
    "vae_tile",
    "loras",
    "config_hash",
]
# metadata.parquet's name for video_path, the one the Hugging Face videofolder loader reads.
FILE_NAME_COLUMN = "file_name"
# Columns the runner writes itself into results.parquet and metadata.parquet, besides the row inputs:
# a manifest column of one of these names would be a second column of that name there.
RUNNER_COLUMNS = tuple(c for c in (*RESULT_COLUMNS, *PROVENANCE_COLUMNS, FILE_NAME_COLUMN) if c not in KNOWN_COLUMNS)
