"""Every bad setting is one sentence and exit 2 before torch loads (issue #26, item 6): type errors,
paths Hydra's grammar cannot read, and a dry run that refuses what the run would refuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from batch_runner.errors import UserError
from batch_runner.outputs.storage import OutputError
from batch_runner.run import runner
from batch_runner.run.overrides import check_overrides
from tests.conftest import ROOT, photo, run_cli, run_config, write_manifest

CONF = ROOT / "conf"


@pytest.mark.parametrize(
    ("arg", "sentence"),
    [
        ("seed=abc", "seed=abc is not a whole number; write seed=<a whole number>"),
        ("seed=1.5", "seed=1.5 is not a whole number"),
        ("chunk_size=1e9", "chunk_size=1e9 is not a whole number"),
        ("overwrite=maybe", "overwrite=maybe is not true or false"),
        ("model.guidance_scale=high", "model.guidance_scale=high is not a number"),
        ("ids=c", "ids is a list; write ids=[c] (several: ids=[a,b])."),
        ("ids=a,b", "ids is a list; write ids=[a,b]."),
        ("manifest=/data/a(1).csv", """quote it, e.g. 'manifest="/data/a(1).csv"' (single quotes for the shell"""),
        ("manifest=/data/a,b.csv", """reserves (,); quote it, e.g. 'manifest="/data/a,b.csv"'"""),
        ("output_dir=~/out", """reserves (~); quote it, e.g. 'output_dir="~/out"' (single quotes for the shell"""),
        ("seed=1,2", "seed=1,2 gives seed several values; it takes one (a whole number)."),
        ("-m", "Hydra's multirun (-m) is not how batch_runner runs several settings"),
        ("--multirun", "run one command per setting, or vary the rows in the manifest."),
    ],
)
def test_a_setting_of_the_wrong_type_or_grammar_is_one_sentence(arg: str, sentence: str) -> None:
    with pytest.raises(UserError) as caught:
        check_overrides([arg], CONF)
    assert sentence in str(caught.value) and "\n" not in str(caught.value)


def test_a_family_option_the_preset_does_not_list_is_set_from_the_command_line() -> None:
    """`model.options.<key>` as the README writes it (Cosmos' guardrail, a Wan option): the preset's
    YAML lists only the options it changes, and Hydra alone refuses any other key with a stack."""
    check_overrides(["model.options.guidance_scale_2=2.0", "model.options.guardrail=false"], CONF)
    wan = run_config("manifest=x", "model=wan2.1-i2v-14b-480p", "model.options.guidance_scale_2=2.0").model
    assert wan.options["guidance_scale_2"] == 2.0
    cosmos = run_config("manifest=x", "model=cosmos-predict2.5-2b", "model.options.guardrail=false").model
    assert cosmos.options == {"guardrail": False}


def test_a_misspelt_family_option_is_refused_by_its_family_naming_the_ones_it_has(tmp_path: Path) -> None:
    from batch_runner.families import family_of

    model = run_config("manifest=x", "model=cosmos-predict2.5-2b", "model.options.guardrai=false").model
    with pytest.raises(
        UserError, match=r"guardrai is not an option of cosmos-predict2\.5-2b .*its options are guardrail"
    ):
        family_of(model).options(model)


@pytest.mark.parametrize(
    "arg",
    ["seed=3", "ids=[c]", "ids=[a,b]", "overwrite=true", "model.guidance_scale=5", "memory.budget_gib=null"],
)
def test_settings_of_the_right_type_pass(arg: str) -> None:
    check_overrides([arg], CONF)


def test_a_quoted_path_with_parentheses_and_commas_reaches_the_config_as_written() -> None:
    for path in ["/data/a(1).csv", "/data/a,b.csv"]:
        check_overrides([f'manifest="{path}"'], CONF)
        assert run_config(f'manifest="{path}"').manifest == path


def test_the_dry_run_refuses_an_output_dir_holding_the_users_files(tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path / "jobs.csv", [{"id": "a", "image": str(photo(tmp_path / "a.png")), "prompt": "x"}]
    )
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = run_config(f"manifest={manifest}", "model=tiny", f"output_dir={out}", "dry_run=true")
    with pytest.raises(OutputError, match=r"already holds files batch_runner did not write \('notes.txt'\)"):
        runner.run(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_a_type_error_on_the_command_line_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    proc = run_cli("manifest=jobs.csv", "seed=abc", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: seed=abc is not a whole number; write seed=<a whole number> (see batch_runner/config.py)."
    ]
