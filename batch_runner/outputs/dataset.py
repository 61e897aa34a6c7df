"""Output ready to train on: a Hugging Face videofolder and, optionally, WebDataset shards.

* metadata.parquet beside videos/ with a `file_name` column: `datasets.load_dataset("videofolder",
  data_dir=output_dir)` gives one example per ok row with its prompt, id, seed and the manifest's
  own columns.
* output.format=webdataset: tar shards under shards/, `<key>.mp4` + `<key>.json` per sample. The
  layout follows the manifest: its ok rows in order, shard_size to a shard, numbered from 000000
  without gaps. Each shard is written atomically and kept only while it holds exactly its samples
  with the JSON they would be written with now (an edited passthrough column changes it), so a
  resumed run rewrites only shards that changed, and no sample is in two shards.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from pathlib import Path
from typing import Any

import pandas as pd

from batch_runner.columns import FILE_NAME_COLUMN
from batch_runner.inputs.ids import sample_key
from batch_runner.inputs.manifest import Manifest
from batch_runner.outputs.storage import atomic_path, atomic_write_parquet

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.parquet"
SHARDS_DIR = "shards"
SAMPLE_COLUMNS = [
    "id",
    "prompt",
    "negative_prompt",
    "seed",
    "num_frames",
    "height",
    "width",
    "fps",
    "num_inference_steps",
    "guidance_scale",
    "model",
    "params_hash",
    "motion",
    "brightness",
    "has_audio",
    "audio_sample_rate",
]
_SHARD_NAME = re.compile(r"shard-(\d{6})\.tar$")


def samples(table: pd.DataFrame, manifest: Manifest) -> pd.DataFrame:
    """The ok rows with the columns a training pipeline wants, manifest columns included."""
    ok = table[table["status"] == "ok"]
    passthrough = [c for c in ok.columns if c in manifest.passthrough]
    return ok[["video_path", *SAMPLE_COLUMNS, *passthrough]].reset_index(drop=True)


def write_metadata(output_dir: Path, table: pd.DataFrame, manifest: Manifest) -> Path:
    metadata = samples(table, manifest).rename(columns={"video_path": FILE_NAME_COLUMN})
    path = output_dir / METADATA_FILE
    atomic_write_parquet(metadata, path)
    return path


def write_shards(
    output_dir: Path, table: pd.DataFrame, manifest: Manifest, shard_size: int, rebuild: bool = False
) -> list[Path]:
    """Bring shards/ in line with the ok rows; returns the shards written now.

    The layout depends on the manifest alone: the ok rows in manifest order, `shard_size` to a shard,
    numbered from shard-000000 without gaps (so `shard-{000000..00000N}.tar` patterns hold). A shard
    already holding exactly its samples, with the same JSON, is kept; any other is written again, and
    shards past the last are removed.
    """
    folder = output_dir / SHARDS_DIR
    folder.mkdir(exist_ok=True)
    ok = samples(table, manifest)
    wanted = {sample_key(r["id"]): r for r in ok.to_dict("records")}
    if len(wanted) != len(ok):
        raise ValueError("two ids map to the same WebDataset key (ids differing only by '.' and '_')")
    keys = list(wanted)
    size = max(1, shard_size)
    layout = {f"shard-{i // size:06d}.tar": keys[i : i + size] for i in range(0, len(keys), size)}
    for shard in sorted(folder.glob("shard-*.tar")):
        if shard.name not in layout or not _SHARD_NAME.search(shard.name):
            shard.unlink()
    written = []
    for name, chunk in layout.items():
        path = folder / name
        if not rebuild and path.is_file() and _shard_contents(path) == {k: _sample_json(wanted[k]) for k in chunk}:
            continue
        _write_shard(path, output_dir, [wanted[k] | {"__key__": k} for k in chunk])
        written.append(path)
    if written:
        log.info("wrote %d WebDataset shard(s) of %d", len(written), len(layout))
    return written


def _write_shard(path: Path, output_dir: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for row in rows:
            key = row.pop("__key__")
            video = output_dir / row.pop("video_path")
            tar.add(video, arcname=f"{key}.mp4")
            meta = json.dumps(_sample_json(row), ensure_ascii=False).encode()
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))


def _sample_json(row: dict[str, Any]) -> dict[str, Any]:
    """A sample's <key>.json content, as read back from a shard (JSON round trip)."""
    meta = {k: _plain(v) for k, v in row.items() if k not in ("video_path", "__key__")}
    return json.loads(json.dumps(meta, ensure_ascii=False))


def _shard_contents(shard: Path) -> dict[str, Any]:
    """key -> the JSON of every sample in a shard (a damaged shard counts as stale)."""
    contents: dict[str, Any] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    contents[member.name[: -len(".json")]] = json.loads(tar.extractfile(member).read())
    except (tarfile.TarError, OSError, json.JSONDecodeError):
        return {"\0damaged": None}
    return contents


def _plain(value: Any) -> Any:
    """JSON-ready scalars (numpy and pandas values become Python ones; missing becomes null)."""
    if hasattr(value, "item"):
        value = value.item()
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value
