"""Output ready to train on: a Hugging Face videofolder and, optionally, WebDataset shards.

* metadata.parquet beside videos/ with a `file_name` column: `datasets.load_dataset("videofolder",
  data_dir=output_dir)` gives one example per ok row with its prompt, id, seed and the manifest's
  own columns.
* output.format=webdataset: tar shards under shards/, `<key>.mp4` + `<key>.json` per sample. Each
  shard is written atomically; which samples a shard holds is read from the shard itself, so a
  resumed run packs only samples no complete shard holds (no duplicates) and drops shards whose
  samples were regenerated or whose metadata changed (an edited passthrough column of the
  manifest): a shard is kept only while every sample's JSON is what it would be written as now.
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

from batch_runner.inputs.manifest import Manifest, sample_key
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
]
_SHARD_NAME = re.compile(r"shard-(\d{6})\.tar$")


def samples(table: pd.DataFrame, manifest: Manifest) -> pd.DataFrame:
    """The ok rows with the columns a training pipeline wants, manifest columns included."""
    ok = table[table["status"] == "ok"]
    passthrough = [c for c in ok.columns if c in manifest.passthrough]
    return ok[["video_path", *SAMPLE_COLUMNS, *passthrough]].reset_index(drop=True)


def write_metadata(output_dir: Path, table: pd.DataFrame, manifest: Manifest) -> Path:
    metadata = samples(table, manifest).rename(columns={"video_path": "file_name"})
    path = output_dir / METADATA_FILE
    atomic_write_parquet(metadata, path)
    return path


def write_shards(
    output_dir: Path, table: pd.DataFrame, manifest: Manifest, shard_size: int, rebuild: bool = False
) -> list[Path]:
    """Bring shards/ in line with the ok rows; returns the shards written now."""
    folder = output_dir / SHARDS_DIR
    folder.mkdir(exist_ok=True)
    wanted = {sample_key(r["id"]): r for r in samples(table, manifest).to_dict("records")}
    if len(wanted) != len(samples(table, manifest)):
        raise ValueError("two ids map to the same WebDataset key (ids differing only by '.' and '_')")
    held: set[str] = set()
    last_index = -1
    for shard in sorted(folder.glob("shard-*.tar")):
        match = _SHARD_NAME.search(shard.name)
        contents = _shard_contents(shard)
        fresh = all(key in wanted and _sample_json(wanted[key]) == meta for key, meta in contents.items())
        if rebuild or not fresh or match is None:
            shard.unlink()
            continue
        held |= contents.keys()
        last_index = max(last_index, int(match.group(1)))
    todo = [key for key in wanted if key not in held]
    written = []
    for start in range(0, len(todo), max(1, shard_size)):
        last_index += 1
        path = folder / f"shard-{last_index:06d}.tar"
        _write_shard(path, output_dir, [wanted[k] | {"__key__": k} for k in todo[start : start + shard_size]])
        written.append(path)
    if written:
        log.info("wrote %d WebDataset shard(s) with %d samples", len(written), len(todo))
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
