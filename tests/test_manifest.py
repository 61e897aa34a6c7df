"""The manifest as users save it, and every message that refuses a row or a file.

Real files on disk throughout: CSVs written byte for byte as spreadsheets write them, Parquet
written by pandas, images written by PIL.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch_runner.columns import KNOWN_COLUMNS
from batch_runner.errors import UserError
from batch_runner.families.rules import frame_problem, nearest_size, size_problem, valid_frame_counts
from batch_runner.inputs.ids import ID_RULE, default_id, derive_seed
from batch_runner.inputs.manifest import Job, Manifest, load_manifest
from batch_runner.inputs.validation import MAX_SEED, RowProblem

from .conftest import photo, run_config, write_manifest

COGVIDEOX = run_config("manifest=unused.csv")  # the default model: cogvideox-5b-i2v
TINY = run_config("manifest=unused.csv", "model=tiny")
COGVIDEOX15 = run_config("manifest=unused.csv", "model=cogvideox1.5-5b-i2v")


def load(path: Path, cfg=COGVIDEOX, base_seed: int | None = None, ids: list[str] | None = None) -> Manifest:
    return load_manifest(path, cfg.model, cfg.seed if base_seed is None else base_seed, ids)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A manifest folder with two real images in it, one in a subfolder."""
    photo(tmp_path / "cat.png", (120, 80))
    photo(tmp_path / "imgs" / "dog.jpg", (90, 60), seed=1)
    return tmp_path


def good_row(**extra: object) -> dict:
    return {"image": "cat.png", "prompt": "a cat on a mat", **extra}


# --- reading CSV as spreadsheets save it --------------------------------------------------------


def test_excel_csv_utf8_bom_crlf_quoted_commas_newlines_and_non_latin_text(folder):
    # What Excel's "CSV UTF-8" writes: a BOM, CRLF line ends, quotes around fields with commas,
    # quotes and line breaks.
    text = (
        "id,image,prompt,negative_prompt,caption\r\n"
        'a1,cat.png,"a cat, sitting on a mat, looks up","blurry, low quality",plain\r\n'
        'a2,imgs/dog.jpg,"first line\r\nsecond line with ""quotes""",,"x, y"\r\n'
        "ja,cat.png,桜の木の下を歩く猫、ゆっくりとカメラが寄る,,日本語\r\n"
        "ar,cat.png,قطة تمشي تحت شجرة الكرز,,عربي\r\n"
    )
    path = folder / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))

    manifest = load(path)

    assert manifest.problems == []
    assert list(manifest.table.columns[:3]) == ["id", "image", "prompt"]  # no BOM glued to 'id'
    jobs = {job.id: job for job in manifest.jobs}
    assert list(jobs) == ["a1", "a2", "ja", "ar"]
    assert jobs["a1"].prompt == "a cat, sitting on a mat, looks up"
    assert jobs["a1"].negative_prompt == "blurry, low quality"
    assert jobs["a2"].prompt in ('first line\r\nsecond line with "quotes"', 'first line\nsecond line with "quotes"')
    assert jobs["a2"].negative_prompt == ""  # the model's default negative prompt
    assert jobs["ja"].prompt == "桜の木の下を歩く猫、ゆっくりとカメラが寄る"
    assert jobs["ar"].prompt == "قطة تمشي تحت شجرة الكرز"
    assert jobs["a2"].image == str((folder / "imgs" / "dog.jpg").resolve())
    assert manifest.passthrough == ["caption"]
    assert list(manifest.table["caption"]) == ["plain", "x, y", "日本語", "عربي"]


def test_bom_before_image_header_is_not_a_missing_column(folder):
    path = folder / "bom.csv"
    path.write_bytes("\ufeffimage,prompt\r\ncat.png,hello\r\n".encode())
    manifest = load(path)
    assert [job.prompt for job in manifest.jobs] == ["hello"]


@pytest.mark.parametrize("sep", [";", "\t"])
def test_semicolon_and_tab_separated_files_are_read(folder, sep):
    # Spreadsheets in locales with a decimal comma save with ';'. Prompts still contain commas,
    # a different number of them per row.
    lines = [
        sep.join(["id", "image", "prompt", "guidance_scale"]),
        sep.join(["r1", "cat.png", "a cat", "5"]),
        sep.join(["r2", "cat.png", "a dog, running, fast, at dusk", "7"]),
        sep.join(["r3", "imgs/dog.jpg", '"quoted; with, both"', "6"]),
    ]
    path = folder / "locale.csv"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8-sig"))

    manifest = load(path)

    assert manifest.problems == []
    assert [(j.id, j.prompt, j.guidance_scale) for j in manifest.jobs] == [
        ("r1", "a cat", 5.0),
        ("r2", "a dog, running, fast, at dusk", 7.0),
        ("r3", "quoted; with, both", 6.0),
    ]


def test_text_that_looks_like_missing_or_numbers_stays_text(folder):
    write_manifest(
        folder / "m.csv",
        [
            {"id": "007", "image": "cat.png", "prompt": "NA"},
            {"id": "1e3", "image": "cat.png", "prompt": "null"},
            {"id": "0x1", "image": "cat.png", "prompt": "None"},
        ],
    )
    manifest = load(folder / "m.csv")
    assert manifest.problems == []
    assert [(j.id, j.prompt) for j in manifest.jobs] == [("007", "NA"), ("1e3", "null"), ("0x1", "None")]


def test_prompt_and_path_whitespace_is_trimmed(folder):
    write_manifest(folder / "m.csv", [{"image": "  cat.png ", "prompt": "  a cat \n"}])
    [job] = load(folder / "m.csv").jobs
    assert job.prompt == "a cat"
    assert job.image == str((folder / "cat.png").resolve())


def test_header_whitespace_is_ignored(folder):
    (folder / "m.csv").write_text(" image , prompt ,seed\ncat.png,a cat,4\n", encoding="utf-8")
    [job] = load(folder / "m.csv").jobs
    assert (job.prompt, job.seed) == ("a cat", 4)


# --- Parquet --------------------------------------------------------------------------------------


def test_parquet_manifest_with_typed_columns_and_nulls(folder):
    table = pd.DataFrame(
        {
            "id": [101, 102, 103],
            "image": ["cat.png", str((folder / "imgs" / "dog.jpg").resolve()), "cat.png"],
            "prompt": ["a cat", "猫が走る", "a third"],
            "seed": pd.array([7, None, 2**62 + 1], dtype="Int64"),
            "num_frames": pd.array([None, 17, 9], dtype="Int64"),
            "guidance_scale": [None, 3.5, 1.0],
            "score": [0.1, 0.2, 0.3],
        }
    )
    path = folder / "m.parquet"
    table.to_parquet(path, index=False)

    manifest = load(path, base_seed=11)

    assert manifest.problems == []
    a, b, c = manifest.jobs
    assert [a.id, b.id, c.id] == ["101", "102", "103"]
    assert (a.seed, b.seed, c.seed) == (7, derive_seed(11, "102"), 2**62 + 1)
    assert (a.num_frames, b.num_frames, c.num_frames) == (49, 17, 9)
    assert (a.guidance_scale, b.guidance_scale, c.guidance_scale) == (6.0, 3.5, 1.0)
    assert b.prompt == "猫が走る"
    assert a.image == c.image == str((folder / "cat.png").resolve())
    assert manifest.passthrough == ["score"]


def test_parquet_row_problems_are_reported_like_csv(folder):
    write_manifest(
        folder / "m.parquet",
        [good_row(id="ok"), good_row(id="bad", num_frames=13), good_row(id="bad2", prompt="")],
    )
    manifest = load(folder / "m.parquet")
    assert [job.id for job in manifest.jobs] == ["ok"]
    assert [(p.row, p.id, p.column) for p in manifest.problems] == [(2, "bad", "num_frames"), (3, "bad2", "prompt")]


# --- image paths ----------------------------------------------------------------------------------


def test_image_paths_relative_to_manifest_folder_not_working_directory(folder, tmp_path_factory, monkeypatch):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    photo(elsewhere / "cat.png", (10, 10))  # a decoy with the same name in the working directory
    monkeypatch.chdir(elsewhere)
    absolute = photo(tmp_path_factory.mktemp("abs") / "abs image.png", (30, 20))
    (folder / "sub").mkdir()
    write_manifest(
        folder / "sub" / "m.csv",
        [
            {"id": "up", "image": "../cat.png", "prompt": "p"},
            {"id": "nested", "image": "../imgs/dog.jpg", "prompt": "p"},
            {"id": "abs", "image": str(absolute), "prompt": "p"},
        ],
    )
    manifest = load_manifest(os.path.relpath(folder / "sub" / "m.csv"), COGVIDEOX.model, 0)

    assert manifest.problems == []
    images = {job.id: job.image for job in manifest.jobs}
    assert images == {
        "up": str((folder / "cat.png").resolve()),
        "nested": str((folder / "imgs" / "dog.jpg").resolve()),
        "abs": str(absolute.resolve()),
    }
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in images.values())


def test_home_relative_image_path_is_expanded(folder, monkeypatch):
    monkeypatch.setenv("HOME", str(folder))
    write_manifest(folder / "m.csv", [{"image": "~/imgs/dog.jpg", "prompt": "p"}])
    [job] = load(folder / "m.csv").jobs
    assert job.image == str((folder / "imgs" / "dog.jpg").resolve())


def test_image_extension_is_case_insensitive(folder):
    photo(folder / "LOUD.JPG", (40, 30))
    write_manifest(folder / "m.csv", [{"image": "LOUD.JPG", "prompt": "p"}])
    assert load(folder / "m.csv").problems == []


# --- ids, defaults and overrides ------------------------------------------------------------------


def test_default_ids_are_stable_row_numbers(folder):
    write_manifest(folder / "m.csv", [good_row(prompt=f"p{i}") for i in range(12)])
    manifest = load(folder / "m.csv")
    expected = [f"row{i:06d}" for i in range(1, 13)]
    assert [job.id for job in manifest.jobs] == expected
    assert list(manifest.table["id"]) == expected
    assert [job.row for job in manifest.jobs] == list(range(1, 13))
    assert default_id(0) == "row000001"
    assert default_id(999_999) == "row1000000"


def test_config_defaults_fill_every_field(folder):
    write_manifest(folder / "m.csv", [good_row()])
    [job] = load(folder / "m.csv").jobs
    model = COGVIDEOX.model
    assert isinstance(job, Job)
    assert (job.num_frames, job.height, job.width) == (49, 480, 720)
    assert (job.num_inference_steps, job.guidance_scale, job.fps) == (50, 6.0, 8.0)
    assert job.negative_prompt == model.negative_prompt
    assert job.seed == derive_seed(COGVIDEOX.seed, "row000001")


def test_command_line_defaults_reach_rows_without_overrides(folder):
    cfg = run_config(
        "manifest=unused.csv",
        "model=tiny",
        "model.num_frames=17",
        "model.num_inference_steps=3",
        "model.negative_prompt=ugly",
        "seed=5",
    )
    write_manifest(folder / "m.csv", [good_row(id="x")])
    [job] = load(folder / "m.csv", cfg=cfg).jobs
    assert (job.num_frames, job.num_inference_steps, job.negative_prompt) == (17, 3, "ugly")
    assert (job.height, job.width) == (64, 96)
    assert job.seed == derive_seed(5, "x")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_per_row_overrides_take_precedence_over_config(folder, suffix):
    override = {
        "seed": 1234,
        "negative_prompt": "text, watermark",
        "num_frames": 17,
        "num_inference_steps": 7,
        "guidance_scale": 2.5,
        "height": 128,
        "width": 192,
        "fps": 12.5,
    }
    blank = dict.fromkeys(override)
    write_manifest(folder / f"m{suffix}", [good_row(id="over", **override), good_row(id="plain", **blank)])
    over, plain = load(folder / f"m{suffix}", cfg=TINY).jobs
    assert (over.id, plain.id) == ("over", "plain")
    for column, value in override.items():
        assert getattr(over, column) == value, column
    model = TINY.model
    assert (plain.num_frames, plain.num_inference_steps, plain.guidance_scale) == (
        model.num_frames,
        model.num_inference_steps,
        model.guidance_scale,
    )
    assert (plain.height, plain.width, plain.fps, plain.negative_prompt) == (
        model.height,
        model.width,
        model.fps,
        model.negative_prompt,
    )
    assert plain.seed == derive_seed(TINY.seed, "plain")


def test_whole_numbers_written_as_decimals_are_accepted(folder):
    (folder / "m.csv").write_text(
        "image,prompt,seed,num_frames,num_inference_steps\ncat.png,p,12.0,17.0, 30 \n", encoding="utf-8"
    )
    [job] = load(folder / "m.csv").jobs
    assert (job.seed, job.num_frames, job.num_inference_steps) == (12, 17, 30)


def test_large_seed_survives_blank_cells_in_its_column(folder):
    # A seed column with a blank cell must not pass through float64 (which rounds above 2**53).
    big = 12345678901234567
    (folder / "m.csv").write_text(
        f"id,image,prompt,seed\na,cat.png,p,{big}\nb,cat.png,p,\nc,cat.png,p,{MAX_SEED}\n", encoding="utf-8"
    )
    a, b, c = load(folder / "m.csv").jobs
    assert a.seed == big
    assert b.seed == derive_seed(0, "b")
    assert c.seed == MAX_SEED


def test_extra_columns_pass_through_unchanged(folder):
    write_manifest(
        folder / "m.csv",
        [
            good_row(id="a", caption="two words", score=0.25, source="https://example.com/a?x=1,2", タグ="猫"),
            good_row(id="b", caption="", score=1.5, source="s", タグ="犬"),
        ],
    )
    manifest = load(folder / "m.csv")
    assert manifest.passthrough == ["caption", "score", "source", "タグ"]
    assert not set(manifest.passthrough) & set(KNOWN_COLUMNS)
    table = manifest.table.set_index("id")
    assert table.loc["a", "caption"] == "two words"
    assert table.loc["a", "source"] == "https://example.com/a?x=1,2"
    assert table.loc["b", "タグ"] == "犬"
    assert float(table.loc["b", "score"]) == 1.5


def test_ids_filter_keeps_original_row_numbers(folder):
    write_manifest(folder / "m.csv", [good_row(id=x) for x in "abcd"])
    manifest = load(folder / "m.csv", ids=["c", "a"])
    assert [(job.id, job.row) for job in manifest.jobs] == [("a", 1), ("c", 3)]


def test_ids_filter_with_unknown_id_is_refused(folder):
    write_manifest(folder / "m.csv", [good_row(id=x) for x in "ab"])
    with pytest.raises(UserError, match=r"ids=\['zz'\] are not in the manifest .*check the spelling"):
        load(folder / "m.csv", ids=["a", "zz"])


# --- derived seeds --------------------------------------------------------------------------------


def test_derived_seed_depends_on_id_and_base_seed_only(folder):
    rows = [good_row(id=x, prompt=f"prompt {x}") for x in ("a", "b", "c")]
    write_manifest(folder / "one.csv", rows)
    # Same ids, other order, other prompts, other images, an extra column: the same seeds.
    shuffled = [
        {"id": "c", "image": "imgs/dog.jpg", "prompt": "different", "note": 1},
        {"id": "a", "image": "cat.png", "prompt": "also different", "note": 2},
        {"id": "b", "image": "imgs/dog.jpg", "prompt": "and this", "note": 3},
    ]
    write_manifest(folder / "two.csv", shuffled)

    first = {job.id: job.seed for job in load(folder / "one.csv", base_seed=3).jobs}
    again = {job.id: job.seed for job in load(folder / "one.csv", base_seed=3).jobs}
    reordered = {job.id: job.seed for job in load(folder / "two.csv", base_seed=3).jobs}
    other_base = {job.id: job.seed for job in load(folder / "one.csv", base_seed=4).jobs}

    assert first == again == reordered
    assert len(set(first.values())) == 3  # different ids, different seeds
    assert all(first[k] != other_base[k] for k in first)
    assert first == {k: derive_seed(3, k) for k in first}


def test_derive_seed_is_pinned_across_versions():
    # Resumed runs and reruns rely on a row keeping its seed: this must never change silently.
    assert derive_seed(0, "row000001") == 3734175623
    assert derive_seed(42, "cat") == 3300259665


@settings(max_examples=200, deadline=None)
@given(base=st.integers(0, MAX_SEED), row_id=st.text(min_size=1, max_size=40))
def test_derive_seed_is_a_deterministic_32_bit_value(base, row_id):
    seed = derive_seed(base, row_id)
    assert seed == derive_seed(base, row_id)
    assert 0 <= seed < 2**32


# --- whole-file problems --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "missing"),
    [
        ("image,caption", "'prompt'"),
        ("prompt,id", "'image'"),
        ("id,text,picture", "'image', 'prompt'"),
        ("Image,Prompt", "'image', 'prompt'"),
    ],
)
def test_missing_required_columns(folder, header, missing):
    path = folder / "m.csv"
    path.write_text(header + "\n" + ",".join(["x"] * len(header.split(","))) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load(path)
    message = str(caught.value)
    assert f"lacks the required column(s) {missing}" in message
    for found in header.split(","):
        assert repr(found) in message
    assert str(path) in message
    if header == "Image,Prompt":  # spreadsheets capitalise: the fix is a rename
        assert message.endswith("rename 'Image' to 'image', 'Prompt' to 'prompt' (column names are lower case).")
    else:
        assert "add them to its header row" in message


def test_missing_required_columns_in_parquet(folder):
    write_manifest(folder / "m.parquet", [{"image": "cat.png", "text": "p"}])
    with pytest.raises(UserError, match=r"lacks the required column\(s\) 'prompt' \(found 'image', 'text'\)"):
        load(folder / "m.parquet")


@pytest.mark.parametrize(
    ("name", "shown"),
    [("m.xlsx", ".xlsx"), ("m.json", ".json"), ("m.txt", ".txt"), ("manifest", "file without extension")],
)
def test_unsupported_manifest_file_type(folder, name, shown):
    path = folder / name
    path.write_text("image,prompt\ncat.png,p\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load(path)
    message = str(caught.value)
    assert f"is a {shown}" in message
    assert "save it as .csv (UTF-8) or .parquet" in message
    assert str(path) in message


def test_uppercase_manifest_suffix_is_accepted(folder):
    write_manifest(folder / "M.CSV", [good_row()])
    assert len(load(folder / "M.CSV").jobs) == 1


def test_missing_manifest(folder):
    with pytest.raises(UserError, match=r"does not exist; pass manifest=PATH to a \.csv or \.parquet file"):
        load(folder / "nope.csv")


def test_manifest_that_is_not_utf8(folder):
    path = folder / "latin1.csv"
    path.write_bytes("image,prompt\ncat.png,caf\xe9 au lait\n".encode("cp1252"))
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte \d+\); save it as 'CSV UTF-8'"):
        load(path)


def test_parquet_that_is_not_parquet(folder):
    path = folder / "broken.parquet"
    path.write_bytes(b"image,prompt\ncat.png,p\n")
    refused = r"could not be read as parquet \(.*magic bytes.*\); save it as Parquet, or name it \.csv"
    with pytest.raises(UserError, match=refused) as no:
        load(path)
    assert str(no.value).count(". ") == 0  # one sentence: pyarrow's second one is dropped


def test_an_unsigned_parquet_seed_above_the_range_is_a_row_problem(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = str(photo(folder / "cat.png"))
    seeds = pa.array([2**64 - 1, 5], pa.uint64())
    pq.write_table(pa.table({"image": [image] * 2, "prompt": ["a", "b"], "seed": seeds}), folder / "u.parquet")
    manifest = load(folder / "u.parquet")
    assert [job.seed for job in manifest.jobs] == [5]
    [problem] = manifest.problems
    assert (problem.row, problem.column) == (1, "seed") and f"{2**64 - 1} is out of range" in problem.reason


def test_a_file_url_is_read_as_the_path_it_names(folder):
    image = photo(folder / "my cat.png")
    write_manifest(folder / "m.csv", [{"image": image.as_uri(), "prompt": "a"}])
    [job] = load(folder / "m.csv").jobs
    assert job.image == str(image.resolve())


def test_a_parquet_image_column_of_bytes_is_named_as_bytes_not_as_an_image_type(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": pa.array([b"cat.png"], pa.binary()), "prompt": ["a"]}), folder / "b.parquet")
    [problem] = load(folder / "b.parquet").problems
    assert problem.column == "image" and problem.reason.startswith("holds bytes, not a path (a Parquet binary column)")


def test_an_empty_csv_is_called_empty(folder):
    (folder / "empty.csv").write_bytes(b"")
    with pytest.raises(UserError, match=r"is empty; give it a header row \(image,prompt\) and a row per video\.$"):
        load(folder / "empty.csv")


# --- row problems: every message names the row, the id, the column and the fix ----------------


def assert_names(problem: RowProblem, row: int, row_id: str | None, column: str, *reason: str) -> None:
    assert (problem.row, problem.id, problem.column) == (row, row_id, column)
    text = str(problem)
    assert text.startswith(f"row {row}")
    if row_id is not None:
        assert f"(id {row_id!r})" in text
    assert f"column '{column}'" in text
    for part in reason:
        assert part in problem.reason, (part, problem.reason)
        assert part in text


# (model, the bad cells, column named, parts of the reason)
ROW_CASES = [
    ("5b", {"prompt": ""}, "prompt", ["the prompt is empty", "write what the video should show"]),
    ("5b", {"prompt": "   "}, "prompt", ["the prompt is empty"]),
    ("5b", {"prompt": None}, "prompt", ["the prompt is empty"]),
    ("5b", {"image": ""}, "image", ["no image path", "relative to the manifest's folder or an absolute one"]),
    ("5b", {"image": "missing.png"}, "image", ["'missing.png' does not exist", "missing.png", "manifest's folder"]),
    ("5b", {"image": "imgs/cat.png"}, "image", ["'imgs/cat.png' does not exist"]),
    ("5b", {"image": "imgs\\cat.png"}, "image", ["does not exist", "separate folders with '/', not '\\'"]),
    ("5b", {"image": "imgs"}, "image", ["is a folder", "give the path of an image file in it"]),
    ("5b", {"image": "clip.mp4"}, "image", ["'clip.mp4' is not a supported image type", ".png", ".jpg"]),
    ("5b", {"seed": "abc"}, "seed", ["'abc' is not a whole number", f"integer from 0 to {MAX_SEED}"]),
    ("5b", {"seed": "1.5"}, "seed", ["'1.5' is not a whole number"]),
    ("5b", {"seed": "nan"}, "seed", ["is not a whole number"]),
    ("5b", {"seed": -1}, "seed", ["-1 is out of range", f"integer from 0 to {MAX_SEED}"]),
    ("5b", {"seed": str(2**63)}, "seed", [f"{2**63} is out of range"]),
    ("5b", {"num_frames": "many"}, "num_frames", ["'many' is not a whole number", "integer from 1 to 10000"]),
    ("5b", {"num_frames": 0}, "num_frames", ["0 is out of range", "integer from 1 to 10000"]),
    ("5b", {"num_frames": 20000}, "num_frames", ["20000 is out of range"]),
    ("5b", {"num_frames": "24.5"}, "num_frames", ["24.5", "is not a whole number"]),
    ("5b", {"num_inference_steps": "ten"}, "num_inference_steps", ["'ten' is not a whole number"]),
    ("5b", {"num_inference_steps": 0}, "num_inference_steps", ["0 is out of range", "integer from 1 to 1000"]),
    ("5b", {"num_inference_steps": 1001}, "num_inference_steps", ["1001 is out of range"]),
    ("5b", {"height": "tall"}, "height", ["'tall' is not a whole number", "integer from 8 to 8192"]),
    ("5b", {"width": 4}, "width", ["4 is out of range", "integer from 8 to 8192"]),
    ("5b", {"height": 9000}, "height", ["9000 is out of range"]),
    ("5b", {"guidance_scale": "strong"}, "guidance_scale", ["'strong' is not a number", "number from 0 to 100"]),
    ("5b", {"guidance_scale": -1}, "guidance_scale", ["is out of range", "number from 0 to 100"]),
    ("5b", {"guidance_scale": "inf"}, "guidance_scale", ["inf", "is out of range"]),
    ("5b", {"fps": 0}, "fps", ["is out of range", "number from 0.1 to 240"]),
    ("5b", {"fps": "fast"}, "fps", ["'fast' is not a number"]),
    # Frame counts the model cannot make: 8N+1 up to 49 for CogVideoX-5B-I2V.
    ("5b", {"num_frames": 13}, "num_frames", ["8N+1 frames, 9 to 49", "not 13", "nearest valid value is 17"]),
    ("5b", {"num_frames": 12}, "num_frames", ["not 12", "nearest valid value is 9"]),
    ("5b", {"num_frames": 1}, "num_frames", ["not 1", "nearest valid value is 9"]),
    ("5b", {"num_frames": 48}, "num_frames", ["nearest valid value is 49"]),
    ("5b", {"num_frames": 81}, "num_frames", ["cogvideox-5b-i2v makes 8N+1", "not 81", "nearest valid value is 49"]),
    # Sizes: CogVideoX-5B-I2V makes 720x480 only.
    (
        "5b",
        {"height": 720, "width": 480},
        "height/width",
        ["makes only 720x480", "not 480x720", "width=720 height=480"],
    ),
    ("5b", {"height": 768, "width": 1360}, "height/width", ["not 1360x768", "use width=720 height=480"]),
    ("5b", {"width": 721}, "height/width", ["not 721x480", "use width=720 height=480"]),
    # The tiny model's size rules: multiples of 16, at least 32, long side at most 192.
    ("tiny", {"height": 100, "width": 100}, "height/width", ["multiples of 16", "width=96 height=96"]),
    ("tiny", {"height": 64, "width": 400}, "height/width", ["at most 192", "width=192 height=64"]),
    ("tiny", {"height": 16, "width": 96}, "height/width", ["at least 32", "width=96 height=32"]),
    (
        "tiny",
        {"num_frames": 13},
        "num_frames",
        ["tiny-cogvideox makes 8N+1 frames, 9 to 49", "nearest valid value is 17"],
    ),
    # CogVideoX1.5: 16N+1 frames up to 161, the short side 768.
    ("1.5", {"num_frames": 40}, "num_frames", ["16N+1 frames, 17 to 161", "nearest valid value is 33"]),
    ("1.5", {"height": 480, "width": 720}, "height/width", ["the short side exactly 768"]),
]
MODELS = {"5b": COGVIDEOX, "tiny": TINY, "1.5": COGVIDEOX15}


@pytest.mark.parametrize(("model", "cells", "column", "reason"), ROW_CASES, ids=lambda v: str(v)[:40])
def test_every_row_problem_names_row_id_column_and_fix(folder, model, cells, column, reason):
    cfg = MODELS[model]
    rows = [good_row(id="first"), good_row(id="bad-row", **cells), good_row(id="last")]
    write_manifest(folder / "m.csv", rows)

    manifest = load(folder / "m.csv", cfg=cfg)

    problems = [p for p in manifest.problems if p.id == "bad-row"]
    assert len(problems) == 1, [str(p) for p in manifest.problems]
    assert_names(problems[0], 2, "bad-row", column, *reason)
    assert "bad-row" not in [job.id for job in manifest.jobs]
    assert "bad-row" in manifest.invalid_ids
    assert column in manifest.invalid_ids["bad-row"]


def test_valid_values_pass_for_each_model(folder):
    cases = [
        (COGVIDEOX, {"num_frames": 9, "height": 480, "width": 720}),
        (COGVIDEOX, {"num_frames": 49}),
        (TINY, {"num_frames": 17, "height": 192, "width": 32}),
        (COGVIDEOX15, {"num_frames": 161, "height": 768, "width": 1360}),
        (COGVIDEOX15, {"num_frames": 17, "height": 1024, "width": 768}),
    ]
    for cfg, cells in cases:
        write_manifest(folder / "m.csv", [good_row(**cells)])
        manifest = load(folder / "m.csv", cfg=cfg)
        assert manifest.problems == [], (cfg.model.name, cells, [str(p) for p in manifest.problems])


UNSAFE_IDS = [
    ("../x", "could write outside output_dir"),
    ("/etc/passwd", "could write outside output_dir"),
    ("C:\\Windows\\x", "could write outside output_dir"),
    ("a/b", "could write outside output_dir"),
    ("a\\b", "could write outside output_dir"),
    ("a:b", "is not a portable file name"),
    ('say"hi"', "is not a portable file name"),
    ("what?", "is not a portable file name"),
    ("star*", "is not a portable file name"),
    ("<tag>", "is not a portable file name"),
    ("pipe|x", "is not a portable file name"),
    (".", "could write outside output_dir"),
    ("..", "could write outside output_dir"),
    ("~root", "could write outside output_dir"),
    ("CON", "is a file name Windows reserves; rename it"),
    ("con", "is a file name Windows reserves"),
    ("Nul.mp4", "is a file name Windows reserves"),
    ("COM1", "is a file name Windows reserves"),
    ("lpt9", "is a file name Windows reserves"),
    ("aux.tar.gz", "is a file name Windows reserves"),
    (".hidden", "would be a hidden file"),
    ("ends.", "ends with '.'"),
    ("x" * 201, "the id is 201 bytes long; keep it under 200"),
    ("猫" * 67, "the id is 201 bytes long"),
]


@pytest.mark.parametrize(("row_id", "reason"), UNSAFE_IDS, ids=[repr(i)[:20] for i, _ in UNSAFE_IDS])
def test_unsafe_ids_are_refused(folder, row_id, reason):
    write_manifest(folder / "m.csv", [good_row(id="fine"), good_row(id=row_id)])
    manifest = load(folder / "m.csv")
    [problem] = manifest.problems
    assert_names(problem, 2, row_id, "id", reason)
    if "Windows" not in reason and "bytes" not in reason:
        assert problem.reason.endswith(ID_RULE)
    assert [job.id for job in manifest.jobs] == ["fine"]


@pytest.mark.parametrize("cell", ["", "   ", None])
def test_empty_id_is_refused_and_named_by_row(folder, cell):
    write_manifest(folder / "m.csv", [good_row(id="fine"), good_row(id="other"), good_row(id=cell)])
    manifest = load(folder / "m.csv")
    [problem] = manifest.problems
    assert_names(problem, 3, None, "id", "the id is empty", "use letters, digits")
    assert str(problem).startswith("row 3, column 'id'")
    assert manifest.invalid_ids == {"row000003": f"column 'id': {problem.reason}"}


def test_control_characters_in_ids_are_refused(folder):
    write_manifest(folder / "m.parquet", [good_row(id="tab\there"), good_row(id="nul\x00"), good_row(id="ok")])
    manifest = load(folder / "m.parquet")
    assert [(p.row, p.column) for p in manifest.problems] == [(1, "id"), (2, "id")]
    assert all("not a portable file name" in p.reason for p in manifest.problems)


def test_safe_ids_are_accepted(folder):
    ids = ["a", "A-1_b.v2", "0001", "猫の動画", "فيديو", "x" * 200, "con_tent", "lpt", "c.o.n"]
    write_manifest(folder / "m.csv", [good_row(id=i) for i in ids])
    manifest = load(folder / "m.csv")
    assert manifest.problems == []
    assert [job.id for job in manifest.jobs] == ids


def test_duplicate_ids_name_the_first_row_using_them(folder):
    write_manifest(
        folder / "m.csv",
        [good_row(id="a"), good_row(id="b"), good_row(id="a"), good_row(id="c"), good_row(id="a"), good_row(id="b")],
    )
    manifest = load(folder / "m.csv")
    assert [(p.row, p.id) for p in manifest.problems] == [(3, "a"), (5, "a"), (6, "b")]
    for problem, first in zip(manifest.problems, [1, 1, 2], strict=True):
        assert_names(problem, problem.row, problem.id, "id", f"duplicate id, also used by row {first}", "unique")
    assert [job.id for job in manifest.jobs] == ["a", "b", "c"]


def test_ids_differing_only_by_case_are_refused_naming_the_first(folder):
    # videos/Cat.mp4 and videos/cat.mp4 are one file on macOS and Windows file systems.
    write_manifest(folder / "m.csv", [good_row(id="cat"), good_row(id="dog"), good_row(id="Cat"), good_row(id="CAT")])
    manifest = load(folder / "m.csv")
    assert [(p.row, p.id, p.column) for p in manifest.problems] == [(3, "Cat", "id"), (4, "CAT", "id")]
    assert "differs from row 1's id 'cat' only by case" in manifest.problems[0].reason
    assert [job.id for job in manifest.jobs] == ["cat", "dog"]
    assert set(manifest.invalid_ids) == {"Cat", "CAT"}


def test_ids_with_one_webdataset_key_are_refused_only_for_webdataset(folder):
    write_manifest(folder / "m.csv", [good_row(id="a.b"), good_row(id="a_b"), good_row(id="c")])
    assert load(folder / "m.csv").problems == []
    manifest = load_manifest(folder / "m.csv", COGVIDEOX.model, 0, output_format="webdataset")
    (problem,) = manifest.problems
    assert (problem.row, problem.id, problem.column) == (2, "a_b", "id")
    assert "same WebDataset key 'a_b' as row 1's id 'a.b'" in str(problem)
    assert [job.id for job in manifest.jobs] == ["a.b", "c"]


def test_a_file_name_column_is_carried_under_a_name_of_its_own_before_anything_runs(folder):
    # metadata.parquet names each video's path file_name: a manifest column of that name would be a
    # second file_name column there, so it is carried as manifest_file_name, and the user is told.
    write_manifest(folder / "m.csv", [good_row(id="a", file_name="cat.png")])
    manifest = load(folder / "m.csv")
    assert "manifest_file_name" in manifest.passthrough and "file_name" not in manifest.table.columns
    assert manifest.notes == [
        f"The manifest {str(folder / 'm.csv')!r} has column(s) named like the runner's own; they are carried as "
        "'file_name' -> 'manifest_file_name'."
    ]


def test_list_and_struct_columns_are_refused_for_webdataset_only(folder):
    rows = [good_row(id="a", tags=["x", "y"], box={"w": 1}), good_row(id="b", tags=["z"], box={"w": 2})]
    write_manifest(folder / "m.parquet", rows)
    assert load(folder / "m.parquet").problems == []  # metadata.parquet holds them as they are
    with pytest.raises(UserError, match=r"list or struct values in column 'tags'.*output.format=videofolder"):
        load_manifest(folder / "m.parquet", COGVIDEOX.model, 0, output_format="webdataset")


def test_ids_select_rows_but_the_manifest_keeps_every_row_for_the_results(folder):
    write_manifest(folder / "m.csv", [good_row(id="a"), good_row(id="b", prompt=""), good_row(id="c")])
    manifest = load(folder / "m.csv", ids=["c"])
    assert [job.id for job in manifest.jobs] == ["c"] and manifest.problems == []  # b's problem is not this run's
    assert list(manifest.record_ids) == ["c"]
    assert list(manifest.all_record_ids) == ["a", "b", "c"]
    # An id selected still clashes with an earlier row left out of the selection.
    write_manifest(folder / "m.csv", [good_row(id="a"), good_row(id="A")])
    (problem,) = load(folder / "m.csv", ids=["A"]).problems
    assert problem.id == "A" and "only by case" in problem.reason


def test_all_bad_rows_are_reported_at_once(folder):
    rows = [
        good_row(id="ok1"),
        good_row(id="p", prompt=""),
        good_row(id="ok2", num_frames=17),
        good_row(id="many", image="nope.png", seed="x", num_frames=13, height=720, width=480),
        good_row(id="ok3"),
        good_row(id="../esc"),
        good_row(id="steps", num_inference_steps=0),
    ]
    rows += [good_row(id=f"fill{i}") for i in range(40)]
    rows.append(good_row(id="tail", guidance_scale="hi"))
    write_manifest(folder / "m.csv", rows)

    manifest = load(folder / "m.csv")

    got = [(p.row, p.id, p.column) for p in manifest.problems]
    assert got == [
        (2, "p", "prompt"),
        (4, "many", "image"),
        (4, "many", "seed"),
        (4, "many", "num_frames"),
        (4, "many", "height/width"),
        (6, "../esc", "id"),
        (7, "steps", "num_inference_steps"),
        (48, "tail", "guidance_scale"),
    ]
    assert [job.id for job in manifest.jobs] == ["ok1", "ok2", "ok3", *(f"fill{i}" for i in range(40))]
    assert set(manifest.invalid_ids) == {"p", "many", "../esc", "steps", "tail"}
    assert manifest.invalid_ids["many"].count("column") == 4
    assert len(manifest.table) == len(rows)


# --- rules ----------------------------------------------------------------------------------------


def test_valid_frame_counts():
    assert valid_frame_counts(COGVIDEOX.model) == [9, 17, 25, 33, 41, 49]
    assert valid_frame_counts(TINY.model) == [9, 17, 25, 33, 41, 49]
    assert valid_frame_counts(COGVIDEOX15.model) == [17, 33, 49, 65, 81, 97, 113, 129, 145, 161]


@pytest.mark.parametrize(
    ("frames", "nearest"),
    [(13, 17), (12, 9), (14, 17), (1, 9), (2, 9), (21, 25), (45, 49), (50, 49), (200, 49)],
)
def test_frame_problem_names_nearest_valid_count(frames, nearest):
    reason = frame_problem(COGVIDEOX.model, frames)
    assert reason is not None
    assert reason.endswith(f"the nearest valid value is {nearest}")
    assert f"not {frames}" in reason
    assert frame_problem(COGVIDEOX.model, nearest) is None


@pytest.mark.parametrize(
    ("model", "asked", "nearest"),
    [
        ("tiny", (64, 96), (64, 96)),
        ("tiny", (100, 100), (96, 96)),
        ("tiny", (10, 10), (32, 32)),
        ("tiny", (64, 1000), (64, 192)),
        ("1.5", (768, 1360), (768, 1360)),
        ("1.5", (720, 1280), (768, 1280)),
        ("1.5", (1080, 1920), (768, 1360)),
        ("1.5", (1920, 1080), (1360, 768)),
        ("1.5", (500, 500), (768, 768)),
    ],
)
def test_nearest_size(model, asked, nearest):
    assert nearest_size(MODELS[model].model, *asked) == nearest
    assert size_problem(MODELS[model].model, *nearest) is None


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(["tiny", "1.5"]),
    height=st.integers(8, 8192),
    width=st.integers(8, 8192),
    frames=st.integers(1, 10_000),
)
def test_suggested_values_are_always_valid(model, height, width, frames):
    rules = MODELS[model].model
    problem = size_problem(rules, height, width)
    near_h, near_w = nearest_size(rules, height, width)
    assert size_problem(rules, near_h, near_w) is None
    assert (problem is None) == ((near_h, near_w) == (height, width))
    if problem is not None:
        assert problem.endswith(f"the nearest valid size is width={near_w} height={near_h}")
    frame_reason = frame_problem(rules, frames)
    if frame_reason is not None:
        suggested = int(frame_reason.rsplit(" ", 1)[1])
        assert frame_problem(rules, suggested) is None


def test_a_refusal_lists_the_first_problems_and_counts_the_rest_by_column(folder):
    """A moved image folder makes every row a problem: the first ones are named, the rest counted."""
    image = photo(folder / "a.png", (720, 480))
    rows = [{"id": f"r{i}", "image": str(folder / f"gone{i}.png"), "prompt": "p"} for i in range(200)]
    rows += [{"id": f"e{i}", "image": str(image), "prompt": ""} for i in range(5)]
    manifest = load(write_manifest(folder / "jobs.csv", rows))
    text = manifest.refusal()
    lines = text.splitlines()
    assert lines[0].endswith("has 205 invalid row(s); nothing was run or written:")
    listed = [line for line in lines if line.startswith("  - row ")]
    assert listed == [f"  - {p}" for p in manifest.problems[:20]]
    assert "  - ... and 185 more problem(s) like these: 180 in column 'image', 5 in column 'prompt'." in lines
    assert "on_invalid=skip" in lines[-1] and len(lines) == 1 + 20 + 1 + 1


@settings(max_examples=60, deadline=None)
@given(
    columns=st.integers(0, 60).flatmap(
        lambda n: st.lists(st.sampled_from(["image", "prompt", "seed", "num_frames"]), min_size=n, max_size=n)
    )
)
def test_a_refusal_accounts_for_every_problem_once(columns):
    problems = [RowProblem(i + 1, f"r{i}", column, "bad") for i, column in enumerate(columns)]
    manifest = Manifest(Path("jobs.csv"), pd.DataFrame(), [], problems, [])
    lines = manifest.refusal().splitlines()
    listed = [line for line in lines if line.startswith("  - row ")]
    assert listed == [f"  - {p}" for p in problems[:20]]
    summary = [line for line in lines if line.startswith("  - ... and ")]
    counted = {}
    for line in summary:
        for n, column in re.findall(r"([\d,]+) in column '(\w+)'", line.split(": ", 1)[1]):
            counted[column] = counted.get(column, 0) + int(n.replace(",", ""))
    assert len(summary) == (len(problems) > 20)
    assert counted == dict(Counter(p.column for p in problems[20:]))
