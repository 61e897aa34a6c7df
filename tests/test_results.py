"""What lands in results.parquet, metadata.parquet and the shards, built without a model: records
are written as the runner writes them, then merged as the main process merges them."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf.errors import OmegaConfBaseException

from batch_runner.errors import UserError
from batch_runner.inputs.manifest import load_manifest
from batch_runner.inputs.reading import read_table
from batch_runner.outputs import dataset
from batch_runner.outputs.provenance import save_config
from batch_runner.outputs.results import PARTS_DIR, ResultLog, ResultRow, merge, read_records
from batch_runner.run import runner
from batch_runner.run.cli import _from_run
from tests.conftest import photo, run_config, write_manifest

STRUCT = pa.struct([("n", pa.int64()), ("label", pa.string())])


def record(row_id: str, **fields) -> ResultRow:
    return ResultRow(
        id=row_id,
        status="ok",
        video_path=f"videos/{row_id}.mp4",
        params_hash="h",
        finished_at="2030-01-01T00:00:00+00:00",
        seed=1,
    ).but(**fields)


def made(out: Path, manifest, ids: list[str]) -> None:
    """Records (and stand-in videos) for these ids, as the runner leaves them."""
    log = ResultLog(out, "run1", rank=0)
    for row_id in ids:
        (out / "videos").mkdir(parents=True, exist_ok=True)
        (out / "videos" / f"{row_id}.mp4").write_bytes(row_id.encode())
        log.append(record(row_id))


def test_a_refused_duplicate_row_is_recorded_under_its_row_number_id(tmp_path: Path) -> None:
    image = str(photo(tmp_path / "in.png"))
    rows = [{"id": f"r{i}", "image": image, "prompt": "the sea"} for i in range(4)]
    rows[2]["id"] = "r0"  # a later repeat of row 1's id
    cfg = run_config(f"manifest={write_manifest(tmp_path / 'jobs.csv', rows)}", "model=tiny", "on_invalid=skip")
    manifest = load_manifest(cfg.manifest, cfg.model, cfg.seed)
    out = tmp_path / "out"
    made(out, manifest, [job.id for job in manifest.jobs])
    runner._record_invalid(cfg, manifest, out, "run1")
    table = merge(out, manifest)
    assert len(table) == len(rows)  # one results row per manifest row
    assert table["id"].tolist() == ["r0", "r1", "row000003", "r3"]
    assert table["status"].tolist() == ["ok", "ok", "failed", "ok"]
    assert "duplicate id, also used by row 1" in table["error"].iloc[2]


def test_a_torn_results_line_is_reported_once_and_removed(tmp_path: Path, caplog) -> None:
    part = tmp_path / PARTS_DIR / "run1.rank00000.jsonl"
    part.parent.mkdir(parents=True)
    whole = json.dumps(record("a").record()) + "\n"
    part.write_text(whole + json.dumps(record("b").record())[:25])  # killed while writing b's line
    with caplog.at_level(logging.WARNING):
        assert read_records(tmp_path)["id"].tolist() == ["a"]
    assert "unfinished line" in caplog.text
    assert part.read_text() == whole
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert read_records(tmp_path)["id"].tolist() == ["a"]
    assert caplog.text == ""  # the next run has nothing to say about it


def parquet_manifest(tmp_path: Path, labels: list[str]) -> Path:
    image = str(photo(tmp_path / "in.png"))
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "image": [image] * 3,
            "prompt": ["x", "y", "z"],
            "meta": pa.array([{"n": 2**60 + 1, "label": labels[0]}, {"n": None, "label": labels[1]}, None], STRUCT),
            "count": pa.array([1, None, 3], pa.int64()),
            "tags": pa.array([[1, 2], [], None], pa.list_(pa.int64())),
        }
    )
    path = tmp_path / "jobs.parquet"
    pq.write_table(table, path)
    return path


def test_passthrough_columns_keep_their_arrow_types(tmp_path: Path) -> None:
    cfg = run_config(f"manifest={parquet_manifest(tmp_path, ['one', 'two'])}", "model=tiny")
    manifest = load_manifest(cfg.manifest, cfg.model, cfg.seed)
    out = tmp_path / "out"
    made(out, manifest, ["a", "b"])  # c not made: its cells are missing in the merge
    table = merge(out, manifest)
    dataset.write_metadata(out, table, manifest)
    for name in ("results.parquet", "metadata.parquet"):
        schema = pq.read_schema(out / name)
        assert schema.field("meta").type == STRUCT, name
        assert schema.field("count").type == pa.int64(), name
        assert schema.field("tags").type == pa.list_(pa.int64()), name
    metadata = pq.read_table(out / "metadata.parquet").to_pylist()
    assert metadata[0]["meta"] == {"n": 2**60 + 1, "label": "one"}  # exact: not through a double
    assert (metadata[1]["meta"], metadata[1]["count"]) == ({"n": None, "label": "two"}, None)
    # pandas reads both back (pandas 3.1 could not parse the dtype names it wrote for these columns),
    # and the results are a manifest of their rows again.
    for name in ("results.parquet", "metadata.parquet"):
        read = pd.read_parquet(out / name)
        assert read.loc[0, "meta"]["label"] == "one" and list(read.loc[0, "tags"]) == [1, 2], name
    again = read_table(out / "results.parquet")
    assert again["meta"].dtype == pd.ArrowDtype(STRUCT) and again.loc[0, "meta"] == {"n": 2**60 + 1, "label": "one"}


def test_a_user_s_parquet_written_by_pandas_with_list_columns_is_a_manifest(tmp_path: Path) -> None:
    """The same unreadable dtype names, in a manifest a user made with DataFrame.to_parquet."""
    image = str(photo(tmp_path / "in.png"))
    frame = pd.DataFrame({"image": [image], "prompt": ["sea"]})
    frame["tags"] = pd.Series(pa.array([["boat", "dusk"]]), dtype=pd.ArrowDtype(pa.list_(pa.string())))
    frame.to_parquet(tmp_path / "jobs.parquet", index=False)
    cfg = run_config(f"manifest={tmp_path / 'jobs.parquet'}", "model=tiny")
    manifest = load_manifest(cfg.manifest, cfg.model, cfg.seed)
    assert manifest.problems == [] and list(manifest.table.loc[0, "tags"]) == ["boat", "dusk"]


def test_rows_of_another_manifest_in_the_folder_are_kept_on_disk_and_said_to_be_left_out(tmp_path, caplog) -> None:
    cfg = run_config(f"manifest={parquet_manifest(tmp_path, ['one', 'two'])}", "model=tiny")
    manifest = load_manifest(cfg.manifest, cfg.model, cfg.seed)
    out = tmp_path / "out"
    made(out, manifest, ["a", "b", "elsewhere"])  # "elsewhere": a row of the folder's earlier manifest
    with caplog.at_level(logging.WARNING):
        table = merge(out, manifest)
    assert list(table["id"]) == ["a", "b"] and (out / "videos" / "elsewhere.mp4").is_file()
    assert "output_dir holds 1 row(s) of another manifest (e.g. 'elsewhere')" in caplog.text


def shard_json(out: Path) -> dict[str, dict]:
    samples = {}
    for shard in sorted((out / dataset.SHARDS_DIR).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    samples[member.name[:-5]] = json.loads(tar.extractfile(member).read())
    return samples


def test_shards_are_refreshed_when_a_passthrough_value_is_edited(tmp_path: Path) -> None:
    cfg = run_config(f"manifest={parquet_manifest(tmp_path, ['one', 'two'])}", "model=tiny")
    manifest = load_manifest(cfg.manifest, cfg.model, cfg.seed)
    out = tmp_path / "out"
    made(out, manifest, ["a", "b"])
    dataset.write_shards(out, merge(out, manifest), manifest, shard_size=1)
    assert shard_json(out)["b"]["meta"] == {"n": None, "label": "two"}
    kept = (out / dataset.SHARDS_DIR / "shard-000000.tar").stat().st_mtime_ns

    # The manifest's passthrough value is edited; the video and its parameters are unchanged.
    cfg = run_config(f"manifest={parquet_manifest(tmp_path, ['one', 'TWO'])}", "model=tiny")
    manifest = load_manifest(cfg.manifest, cfg.model, cfg.seed)
    dataset.write_shards(out, merge(out, manifest), manifest, shard_size=1)
    samples = shard_json(out)
    assert sorted(samples) == ["a", "b"]  # no duplicates
    assert samples["b"]["meta"] == {"n": None, "label": "TWO"}
    assert samples["a"]["meta"] == {"n": 2**60 + 1, "label": "one"}
    assert (out / dataset.SHARDS_DIR / "shard-000000.tar").stat().st_mtime_ns == kept  # a's shard untouched


def test_from_run_applies_group_choices_as_a_fresh_run_composes_them(tmp_path: Path) -> None:
    saved = run_config("manifest=jobs.csv", "model=tiny", "model.num_inference_steps=2", "memory=group_offload")
    save_config(saved, tmp_path)
    cfg = _from_run(tmp_path, ["from_run=x", "model=cogvideox1.5-5b-i2v", "memory=none", "model.path=/models/x"])
    assert (cfg.model.name, cfg.model.num_frames, cfg.model.path) == ("cogvideox1.5-5b-i2v", 81, "/models/x")
    assert cfg.memory.plan == "none"
    again = _from_run(tmp_path, ["model=tiny"])
    assert again.model.num_inference_steps == 4  # the group's YAML, not the earlier run's override
    assert again.manifest.endswith("jobs.csv") and again.from_run == str(tmp_path.resolve())


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "missing mandatory value: manifest"),
        ("[[[: not yaml", "while parsing"),
        ("- model\n- seed\n", "ListConfig"),
        ("manifest: jobs.csv\nseed: abc\n", "abc"),
    ],
    ids=["empty", "not-yaml", "a-list", "a-wrong-type"],
)
def test_from_run_of_a_folder_whose_config_yaml_is_broken_is_one_sentence(tmp_path: Path, text: str, why: str) -> None:
    (tmp_path / "config.yaml").write_text(text)
    broken = rf"from_run='.*': its config.yaml is not a run's saved settings \(.*{why}"
    with pytest.raises(UserError, match=broken) as no:
        _from_run(tmp_path, [])
    assert "\n" not in str(no.value) and str(no.value).endswith("instead of from_run.")


def test_from_run_with_an_unknown_group_choice_is_one_sentence(tmp_path: Path) -> None:
    save_config(run_config("manifest=jobs.csv", "model=tiny"), tmp_path)
    with pytest.raises(UserError, match="model=nope"):
        _from_run(tmp_path, ["model=nope"])
    with pytest.raises((UserError, OmegaConfBaseException)):
        _from_run(tmp_path, ["speed=fast"])
