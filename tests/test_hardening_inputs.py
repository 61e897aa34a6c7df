"""Bad inputs get accurate, one-sentence answers before anything runs (issue #26, item 7): id rules
(Unicode normalisation, control, bidi and zero-width characters) whose refusal says the rule, paths
that are folders, URLs, pipes or link loops, CSV rows and headers that do not fit, and WebDataset shards
numbered from the manifest."""

from __future__ import annotations

import os
import tarfile
import unicodedata
from pathlib import Path

import pytest

from batch_runner.errors import UserError
from batch_runner.inputs.ids import ID_RULE, id_problem
from batch_runner.inputs.manifest import load_manifest
from batch_runner.outputs import dataset
from batch_runner.outputs.results import ResultLog, ResultRow, merge
from batch_runner.outputs.storage import check_output_dir
from tests.conftest import photo, run_config, write_manifest

CFG = run_config("manifest=unused.csv", "model=tiny")


def load(path: Path, output_format: str = "videofolder"):
    return load_manifest(path, CFG.model, 0, output_format=output_format)


def rows_with_ids(folder: Path, ids: list[str]) -> Path:
    image = str(photo(folder / "in.png"))
    return write_manifest(folder / "m.parquet", [{"id": i, "image": image, "prompt": "sea"} for i in ids])


def test_an_id_written_as_nfc_and_as_nfd_is_one_id_refused_as_a_duplicate(tmp_path: Path) -> None:
    nfc, nfd = unicodedata.normalize("NFC", "über"), unicodedata.normalize("NFD", "über")
    assert nfc != nfd
    manifest = load(rows_with_ids(tmp_path, [nfc, nfd]))
    (problem,) = manifest.problems
    assert (problem.row, problem.column) == (2, "id")
    assert "is row 1's id 'über' written with other Unicode code points (NFC normalisation" in problem.reason


@pytest.mark.parametrize(
    "row_id", ["evil\u202egnp.mp4", "zero\u200bwidth", "join\u200dme", "bom\ufeff", "c1\x85x", "tab\there", "nul\x00"]
)
def test_control_bidi_and_zero_width_characters_are_refused_by_code_point(tmp_path: Path, row_id: str) -> None:
    manifest = load(rows_with_ids(tmp_path, ["fine", row_id]))
    (problem,) = manifest.problems
    hidden = next(c for c in row_id if unicodedata.category(c) in ("Cc", "Cf"))
    assert f"U+{ord(hidden):04X}" in problem.reason and problem.reason.endswith(ID_RULE)
    assert [job.id for job in manifest.jobs] == ["fine"]


def test_the_id_rule_text_says_exactly_what_is_accepted() -> None:
    # Everything the text allows is accepted: letters of any script, digits, spaces, punctuation...
    for row_id in ["a b", "x+y", "(1)", "a,b", "ü", "猫", "a'b", "50%", "a#b", "a=b", "a&b", "[x]", "{x}", "a!", "a@b"]:
        assert id_problem(row_id) is None, row_id
    # ...and each character it names is refused.
    for char in '/\\:*?"<>|':
        assert id_problem(f"a{char}b").endswith(ID_RULE), char
    for char in ["\x01", "\u202e", "\u200b", "\u2066"]:
        assert id_problem(f"a{char}b").endswith(ID_RULE)


def test_a_manifest_that_is_a_folder_url_pipe_or_link_loop_is_called_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "jobs.csv").mkdir()
    os.mkfifo(tmp_path / "pipe.csv")
    (tmp_path / "loop.csv").symlink_to(tmp_path / "loop.csv")
    cases = {
        "jobs.csv": "is a folder;",
        "pipe.csv": "is not a regular file (a pipe, socket or device);",
        "loop.csv": "is a symbolic link that points back to itself (a loop);",
        "missing.csv": "does not exist;",
    }
    for name, words in cases.items():
        with pytest.raises(UserError) as caught:
            load(tmp_path / name)
        assert words in str(caught.value), name
    with pytest.raises(UserError, match=r"is a URL; download it"):
        load_manifest("http://example.com/jobs.csv", CFG.model, 0)


def test_a_csv_field_longer_than_the_csv_modules_limit_is_read(tmp_path: Path) -> None:
    """A prompt of 500,000 characters (the csv module's default limit is 131,072): the text encoder
    truncates it with a warning on its row, as any long prompt."""
    image = str(photo(tmp_path / "a.png"))
    manifest = write_manifest(tmp_path / "jobs.csv", [{"id": "a", "image": image, "prompt": "sea " * 125_000}])
    assert load(manifest).jobs[0].prompt == ("sea " * 125_000).strip()


def test_image_paths_that_are_urls_pipes_or_loops_are_called_what_they_are(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    photo(tmp_path / "photo.jfif")
    rows = [
        {"id": i, "image": p, "prompt": "x"}
        for i, p in zip("abcd", ["http://x/a.png", "pipe.png", "loop.png", "photo.jfif"], strict=True)
    ]
    manifest = load(write_manifest(tmp_path / "m.csv", rows))
    reasons = {p.id: p.reason for p in manifest.problems}
    assert "is a URL; download the image" in reasons["a"]
    assert "is not a regular file (a pipe, socket or device)" in reasons["b"]
    assert "points back to itself (a loop)" in reasons["c"]
    assert [job.id for job in manifest.jobs] == ["d"]  # .jfif is a JPEG


def test_a_row_with_more_fields_than_the_header_is_refused_naming_the_row(tmp_path: Path) -> None:
    photo(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image,prompt\na.png,the sea\na.png,a boat, at night\n")
    with pytest.raises(UserError) as caught:
        load(tmp_path / "m.csv")
    assert "has 3 fields in row 2 but 2 column names in its header; quote fields that hold ','" in str(caught.value)
    (tmp_path / "one.csv").write_text("image,prompt\na.png,a boat, at night\n")  # pandas took it for an index
    with pytest.raises(UserError, match=r"has 3 fields in row 1 but 2 column names"):
        load(tmp_path / "one.csv")


def test_a_column_named_twice_in_the_header_is_refused(tmp_path: Path) -> None:
    photo(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image,prompt,prompt \na.png,the sea,a boat\n")
    with pytest.raises(UserError, match=r"names the column\(s\) 'prompt' more than once in its header row"):
        load(tmp_path / "m.csv")


def test_a_folder_holding_only_desktop_files_counts_as_empty(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"\0")
    check_output_dir(out, tmp_path / "jobs.csv")  # no refusal
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"'notes.txt'"):
        check_output_dir(out, tmp_path / "jobs.csv")


def test_webdataset_shards_are_numbered_from_the_manifest_without_gaps(tmp_path: Path) -> None:
    image = str(photo(tmp_path / "in.png"))
    ids = ["a", "b", "c", "d", "e"]
    path = write_manifest(tmp_path / "m.csv", [{"id": i, "image": image, "prompt": i} for i in ids])
    out = tmp_path / "out"
    (out / "videos").mkdir(parents=True)
    for i in ids:
        (out / "videos" / f"{i}.mp4").write_bytes(i.encode())
        ResultLog(out, "r1", 0).append(ResultRow(id=i, status="ok", video_path=f"videos/{i}.mp4", finished_at="1"))
    manifest = load(path, "webdataset")
    dataset.write_shards(out, merge(out, manifest), manifest, shard_size=2)
    kept = (out / "shards" / "shard-000000.tar").stat().st_mtime_ns

    # Row b is removed from the manifest: its shard changes, and the numbers stay 0, 1, 2 in manifest order.
    path = write_manifest(tmp_path / "m.csv", [{"id": i, "image": image, "prompt": i} for i in ids if i != "b"])
    manifest = load(path, "webdataset")
    dataset.write_shards(out, merge(out, manifest), manifest, shard_size=2)
    shards = sorted((out / "shards").glob("*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    held = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            held.append([m.name for m in tar if m.name.endswith(".json")])
    assert held == [["a.json", "c.json"], ["d.json", "e.json"]]
    assert (out / "shards" / "shard-000000.tar").stat().st_mtime_ns != kept

    dataset.write_shards(out, merge(out, manifest), manifest, shard_size=2)  # nothing changed: nothing rewritten
    assert [s.stat().st_mtime_ns for s in sorted((out / "shards").glob("*.tar"))] == [
        s.stat().st_mtime_ns for s in shards
    ]
