"""On two CUDA GPUs (run on the device machine): a replica of two GPUs, with Ulysses or ring attention,
makes the frames that two independent one-GPU replicas make, up to bf16 noise.

The model is Wan 2.2 TI2V-5B's real architecture with random weights (built identically on each
GPU from one seed: no download), at a small row: the tiny models' head size (12) keeps them off the
cuDNN and flash kernels that ring attention needs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from batch_runner.run.launch import accelerate_launch
from tests.conftest import frames_of, ok, photo, run_cli, write_manifest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]
MODEL = ("model=wan2.2-ti2v-5b", "model.weights=random")
ROW = {"num_frames": 17, "height": 256, "width": 256, "num_inference_steps": 3}  # 5 x 8 x 8 = 320 tokens


def two_gpus(*args: str):
    return run_cli(*MODEL, "output.crf=0", *args, launcher=accelerate_launch(2), timeout=900)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpu-replicas")
    rows = [
        {"id": f"r{i}", "image": str(photo(folder / f"{i}.png", seed=i)), "prompt": "waves", **ROW} for i in range(2)
    ]
    return write_manifest(folder / "jobs.csv", rows)


@pytest.fixture(scope="module")
def independent(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("independent") / "out"
    ok(two_gpus(f"manifest={manifest}", f"output_dir={out}", "speed.compile=off"))
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        ("replica.attention=ulysses", "speed.compile=off"),
        ("replica.attention=ring", "speed.compile=off"),
        ("replica.attention=ulysses", "speed.compile=on"),  # compiled blocks under the context-parallel hooks
    ],
    ids=["ulysses", "ring", "ulysses-compiled"],
)
def test_a_replica_of_two_gpus_makes_the_frames_of_one(manifest, independent, tmp_path, overrides) -> None:
    out = tmp_path / "out"
    ok(two_gpus(f"manifest={manifest}", f"output_dir={out}", "replica.gpus=2", *overrides))
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["status"]) == {"ok"} and set(table["rank"]) == {0} and set(table["gpus_per_replica"]) == {2}
    for row_id in table["id"]:
        split = frames_of(out / "videos" / f"{row_id}.mp4").astype(np.int16)
        whole = frames_of(independent / "videos" / f"{row_id}.mp4").astype(np.int16)
        assert split.shape == whole.shape
        assert np.abs(split - whole).mean() < 2.0, row_id
