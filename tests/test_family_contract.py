"""What every model family promises, checked for every family alike.

Each family declares its tiny configs, its full-size configs and its bad rows in one small class
(`CogVideoXContract`, `WanContract`, ...) and inherits the shared checks of `FamilyContract`, the way
diffusers' PipelineTesterMixin works: a new family is one more declaration, and every check runs for
it. Everything here runs in this process (configs composed as the command line composes them, the
manifest loader, the planner, dry_run's description), except one end-to-end run per family, one
process and two, as a user runs it. What only one family does lives in tests/test_family_<name>.py.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from diffusers import ModelMixin

from batch_runner.errors import UserError
from batch_runner.families import FAMILY_MODULES, family_named
from batch_runner.families.base import arch_json
from batch_runner.inputs.images import load_image
from batch_runner.inputs.manifest import load_manifest
from batch_runner.replica import planner, speed
from batch_runner.replica.anatomy import anatomy
from batch_runner.replica.pipeline import build_pipeline, random_pipeline
from batch_runner.replica.planner import auto_plan
from batch_runner.run.checks import check_settings

from .conftest import ROOT, made_by_one_process_and_by_two, photo, run_config, same_video, write_manifest

BUDGETS = (80.0, 48.0, 24.0, 16.0, 12.0)
# The model fields that became families' options, at the defaults they had (as every config.yaml saved
# before them holds them, whatever the family).
FORMER_DEFAULTS = {
    "timestep_spacing": "trailing",
    "use_dynamic_cfg": True,
    "guidance_scale_2": None,
    "boundary_ratio": None,
    "expand_timesteps": False,
}


@dataclass(frozen=True)
class Tiny:
    """A tiny config: the components its pipeline has, and a row it makes (frames, height, width)."""

    name: str
    components: frozenset[str]
    row: tuple[int, int, int]


@dataclass(frozen=True)
class FullSize:
    """A full-size config, read from its architecture without weights: its components, billions of
    parameters per denoiser (bf16), repeated blocks, the transformer's width, and the tokens of one
    video ((frames, height, width, text) -> count)."""

    name: str
    components: frozenset[str]
    denoiser_b: float
    blocks: int
    hidden: int
    tokens: tuple[tuple[int, int, int, int], int]
    others_b: dict[str, float] = field(default_factory=dict)  # other components' billions, where measured
    budgets: tuple[float, ...] = BUDGETS
    host_budget_gib: float = 120.0


@dataclass(frozen=True)
class BadRow:
    """A row the config cannot make (the manifest's columns that make it bad) and the sentence naming why."""

    config: str
    columns: dict[str, Any]
    message: str


# The distilled / LoRA fast presets and their tiny twins: checked by tests/test_lora.py (merged after
# this module's declarations were written; to be declared here as full-size and tiny configs).
FAST_PRESETS = {
    "wan2.1-i2v-14b-480p-lightx2v",
    "wan2.1-i2v-14b-720p-lightx2v",
    "wan2.2-i2v-a14b-lightning",
    "ltx-video-13b-0.9.7-distilled",
    "hunyuanvideo1.5-i2v-480p-step-distilled",
    "tiny-wan-lightx2v",
    "tiny-wan22-lightning",
    "tiny-ltx-distilled",
    "tiny-hunyuan15-step-distilled",
    "ltx-2-distilled",
    "tiny-ltx2-distilled",
}


class FamilyContract:
    """The shared checks. A subclass declares:"""

    family: ClassVar[str]
    tiny: ClassVar[tuple[Tiny, ...]]
    full_size: ClassVar[tuple[FullSize, ...]]
    bad_rows: ClassVar[tuple[BadRow, ...]]
    guidance_batch: ClassVar[int]  # a guided row's forward: both guidance passes (2) or one each (1)
    fuses_qkv: ClassVar[bool] = True  # speed.fuse_qkv finds projections to fuse
    # The blocks' inputs the family's path hands over in another layout than row-major, which
    # speed.SteadyInputs copies (once a forward, at the first block).
    copied_at_first_block: ClassVar[frozenset[str]] = frozenset()
    # The end-to-end run: a tiny config, its extra overrides, and its rows (without the image) with the
    # shape each must have; None where another test file runs the family end to end.
    end_to_end: ClassVar[tuple[str, tuple[str, ...], dict[str, tuple[dict, tuple]]] | None] = None
    recorded: ClassVar[dict[str, Any]] = {}  # results columns every row of that run must hold, with their value

    # --- configs and options ----------------------------------------------------------------------

    def test_every_config_of_the_family_is_declared_here(self):
        configs = {
            path.stem
            for path in (ROOT / "conf" / "model").glob("*.yaml")
            if path.stem != "tiny"
            and path.stem not in FAST_PRESETS
            and run_config("manifest=x", f"model={path.stem}").model.family == self.family
        }
        assert configs == {t.name for t in self.tiny} | {f.name for f in self.full_size}

    def test_every_config_lists_each_option_of_its_family_and_passes_the_checks(self):
        """Listed, an option is set on the command line as model.options.<key>=... (no `+`)."""
        family = family_named(self.family)
        keys = {f.name for f in dataclasses.fields(family.Options)}
        for name in [t.name for t in self.tiny] + [f.name for f in self.full_size]:
            cfg = run_config("manifest=x", f"model={name}")
            assert set(cfg.model.options) == keys, name
            check_settings(cfg)
            assert isinstance(family.options(cfg.model), family.Options)
            for key in keys:
                value = getattr(family.options(cfg.model), key)
                changed = run_config("manifest=x", f"model={name}", f"model.options.{key}={_yaml(value)}")
                assert getattr(family.options(changed.model), key) == value

    def test_an_option_the_family_does_not_have_is_refused_naming_its_options(self):
        family = family_named(self.family)
        keys = [f.name for f in dataclasses.fields(family.Options)]
        cfg = run_config("manifest=x", f"model={self.tiny[0].name}", "+model.options.colour=1")
        with pytest.raises(UserError, match=r"model\.options\.colour is not an option of") as refused:
            check_settings(cfg)
        assert all(key in str(refused.value) for key in keys)
        if not keys:
            assert "leave model.options empty" in str(refused.value)

    def test_an_option_of_the_wrong_type_is_refused_by_name(self):
        keys = [f.name for f in dataclasses.fields(family_named(self.family).Options)]
        if not keys:
            pytest.skip(f"{self.family} has no options (the test above refuses any)")
        for key in keys:
            cfg = run_config("manifest=x", f"model={self.tiny[0].name}", f"model.options.{key}=[1,2]")
            with pytest.raises(UserError, match=rf"model\.options\.{key}=\[1, 2\] must be "):
                check_settings(cfg)

    def test_the_options_that_change_the_video_change_the_output_salt(self):
        from batch_runner.outputs.provenance import output_salt

        family = family_named(self.family)
        if not any(family.output_options(run_config("manifest=x", f"model={t.name}").model) for t in self.tiny):
            pytest.skip(f"{self.family}'s tiny models have no options that change the video")
        for t in self.tiny:
            cfg = run_config("manifest=x", f"model={t.name}")
            assert set(family.output_options(cfg.model)) <= {f.name for f in dataclasses.fields(family.Options)}
            for key, value in family.output_options(cfg.model).items():
                other = _other_value(family, key, value)
                changed = replace(cfg, model=replace(cfg.model, options={**cfg.model.options, key: other}))
                assert output_salt(changed) != output_salt(cfg), (t.name, key)

    def test_a_folder_saved_before_options_were_per_family_replays_with_the_same_options_and_salt(self, tmp_path):
        """config.yaml of earlier runs held every family's options at the top of `model` (at their
        defaults where another family's): from_run=FOLDER still runs, and resumes, as it did."""
        from omegaconf import OmegaConf

        from batch_runner.outputs.provenance import CONFIG_FILE, output_salt
        from batch_runner.run.cli import _from_run

        for t in self.tiny:
            cfg = run_config("manifest=x", f"model={t.name}")
            saved = OmegaConf.to_container(OmegaConf.structured(cfg))
            options = saved["model"].pop("options")
            # Only the former model fields were ever at the top; a newer family's own options stay put.
            saved["model"] |= FORMER_DEFAULTS | {k: v for k, v in options.items() if k in FORMER_DEFAULTS}
            if newer := {k: v for k, v in options.items() if k not in FORMER_DEFAULTS}:
                saved["model"]["options"] = newer
            folder = tmp_path / t.name
            folder.mkdir()
            (folder / CONFIG_FILE).write_text(OmegaConf.to_yaml(saved))
            replayed = OmegaConf.to_object(_from_run(folder, []))
            assert replayed.model == cfg.model, t.name
            assert output_salt(replayed) == output_salt(cfg)

    # --- the tiny models --------------------------------------------------------------------------

    def test_tiny_pipelines_have_the_familys_components(self, tiny: Tiny):
        model = run_config("manifest=x", f"model={tiny.name}").model
        pipe = build_pipeline(model)
        family = family_named(self.family)
        assert isinstance(pipe, family.pipeline_class)
        roles = family.components(pipe)
        assert roles == anatomy(model).roles
        assert set(roles) == tiny.components

    def test_tiny_model_makes_the_rows_video_and_streamlining_and_fusing_change_nothing(self, tiny: Tiny, tmp_path):
        """The runner's path (prompts encoded beforehand) makes a video of the row's shape; its changes
        to the transformer (the family's streamline) and fusing QKV, as the runner does, leave it as
        diffusers' stock transformer makes it."""
        cfg = run_config("manifest=x", f"model={tiny.name}")
        made = []
        for streamline, fuse in ((False, False), (True, False), (True, True)):
            pipe = build_pipeline(cfg.model)
            if streamline:
                family_named(self.family).streamline(pipe.transformer, cfg.model)
            if fuse:
                assert (speed.fuse_qkv(pipe.transformer) > 0) == self.fuses_qkv
            made.append(_video(self.family, cfg.model, pipe, tiny.row, tmp_path))
        frames, height, width = tiny.row
        assert made[0].shape == (frames, 3, height, width)
        for changed in made[1:]:
            torch.testing.assert_close(changed, made[0], rtol=1e-4, atol=1e-4)

    def test_compiled_blocks_trace_one_graph_for_a_shape_whatever_the_prompt(self, tiny: Tiny, tmp_path, monkeypatch):
        """The runner's compiled blocks (speed.compile_blocks with the family's text_length_inputs)
        serve a video shape with one graph: the guided branches, prompts of other lengths and the
        first block alike. A graph per prompt length would compile again for nearly every row of a
        dataset (Kandinsky 5's did). Every block is handed row-major tensors, and the family's own
        path hands them so already but for the inputs it declares (`copied_at_first_block`)."""
        import torch._dynamo
        from torch._dynamo.utils import counters

        # Graphs and their guards are dynamo's; the backend only turns them into code.
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
        cfg = run_config("manifest=x", f"model={tiny.name}")
        family = family_named(self.family)
        pipe = build_pipeline(cfg.model)
        denoisers = [getattr(pipe, n) for n, role in family.components(pipe).items() if role == planner.DENOISER]
        handed, given = set(), set()  # (input, row-major) before and after compile_blocks' own hook

        def recorder(seen: set, names: list[str]):
            def record(block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                for name, value in [*zip(names, args, strict=False), *kwargs.items()]:
                    if isinstance(value, torch.Tensor):
                        seen.add((name, value.is_contiguous()))

            return record

        torch._dynamo.reset()
        counters.clear()
        for denoiser in denoisers:
            family.streamline(denoiser, cfg.model)
            speed.fuse_qkv(denoiser)
            blocks = family.blocks(denoiser)
            names = [list(inspect.signature(block.forward).parameters) for block in blocks]
            speed.compile_blocks(blocks, family.text_length_inputs)
            for block, its_names in zip(blocks, names, strict=True):
                block.register_forward_pre_hook(recorder(handed, its_names), with_kwargs=True, prepend=True)
                block.register_forward_pre_hook(recorder(given, its_names), with_kwargs=True)
        _video(self.family, cfg.model, pipe, tiny.row, tmp_path, prompt="a sea")
        graphs = counters["stats"]["unique_graphs"]
        assert 1 <= graphs <= len(denoisers), counters["stats"]
        longer = "a sea at night under a full moon, waves rolling slowly onto a long empty beach of pale sand"
        _video(self.family, cfg.model, pipe, tiny.row, tmp_path, prompt=longer)
        assert counters["stats"]["unique_graphs"] == graphs, counters["stats"]
        assert given and all(row_major for _, row_major in given)
        assert {name for name, row_major in handed if not row_major} == self.copied_at_first_block

    def test_a_saved_tiny_pipeline_loads_through_model_path_and_makes_the_same_video(self, tiny: Tiny, tmp_path):
        model = run_config("manifest=x", f"model={tiny.name}").model
        built = build_pipeline(model)
        built.save_pretrained(tmp_path / "saved")
        loaded_model = replace(model, weights="pretrained", path=str(tmp_path / "saved"))
        loaded = build_pipeline(loaded_model)
        assert type(loaded) is type(built)
        assert family_named(self.family).components(loaded) == family_named(self.family).components(built)
        made = [_video(self.family, m, p, tiny.row, tmp_path) for m, p in ((model, built), (loaded_model, loaded))]
        torch.testing.assert_close(made[1], made[0], rtol=1e-5, atol=1e-5)

    def test_a_tiny_pipeline_in_bfloat16_has_the_dtypes_from_pretrained_gives_it(self, tiny: Tiny, tmp_path):
        """Built in code and cast, each weight has the dtype loading the saved pipeline in bfloat16
        gives it: the modules a diffusers model keeps in float32 stay there (Kandinsky 5's time
        embeddings: cast to bf16, they meet float32 inputs and the first step fails on a GPU)."""
        model = run_config("manifest=x", f"model={tiny.name}").model
        build_pipeline(model).save_pretrained(tmp_path / "saved")
        built = build_pipeline(replace(model, dtype="bfloat16"))
        loaded = build_pipeline(replace(model, dtype="bfloat16", weights="pretrained", path=str(tmp_path / "saved")))
        for name, component in loaded.components.items():
            if isinstance(component, ModelMixin):
                want = {k: p.dtype for k, p in component.named_parameters()}
                assert {k: p.dtype for k, p in getattr(built, name).named_parameters()} == want, name

    # --- the full-size models, without weights ----------------------------------------------------

    def test_full_size_anatomy_is_read_from_the_architecture_without_weights(self, full: FullSize):
        model = run_config("manifest=x", f"model={full.name}").model
        shape = anatomy(model)
        billions = {n: b / 2 / 1e9 for n, b in shape.bytes.items()}  # bf16
        denoisers = shape.of_role("denoiser")
        assert denoisers and all(billions[d] == pytest.approx(full.denoiser_b, rel=0.1) for d in denoisers), billions
        for name, expected in full.others_b.items():
            assert billions[name] == pytest.approx(expected, rel=0.05), (name, billions)
        assert set(shape.roles) == full.components
        assert shape.blocks == full.blocks and shape.geometry.hidden == full.hidden
        assert shape.family.forward_batch(model, guided=True) == self.guidance_batch
        (frames, height, width, text), tokens = full.tokens
        assert shape.geometry.tokens(frames, height, width, text) == tokens

    def test_the_full_size_transformers_head_size_is_one_the_fused_kernels_take(self, full: FullSize):
        """The attention kernel (FA4 or cuDNN) is chosen by the head size the family reads from the
        transformer's config: every released checkpoint has 64 or 128."""
        model = run_config("manifest=x", f"model={full.name}").model
        config = arch_json(model.arch, "transformer")
        assert family_named(self.family).attention_head_size(config) in (64, 128), config

    def test_the_benchmarks_random_build_is_the_familys_pipeline(self, full: FullSize):
        """scripts/benchmark.py builds conf/arch/<arch> with random weights on the GPU; on the meta
        device the same code checks the architecture files and the pipeline's assembly."""
        model = run_config("manifest=x", f"model={full.name}", "model.weights=random").model
        pipe = random_pipeline(model, torch.bfloat16, "meta")
        family = family_named(self.family)
        assert type(pipe) is family.pipeline_class
        assert set(family.components(pipe)) == set(anatomy(model).roles)
        assert len(family.blocks(pipe.transformer)) == anatomy(model).blocks

    def test_auto_picks_the_fastest_plan_that_fits_every_budget(self, full: FullSize):
        cfg = run_config("manifest=x", f"model={full.name}", f"memory.host_budget_gib={full.host_budget_gib}")
        ladder = planner.LADDER
        for budget in full.budgets:
            choice = auto_plan(cfg, budget, 1)
            chosen = next(e for e in choice.estimates if e.plan == choice.plan)
            assert chosen.gpu_gib <= budget, (budget, choice.reason)
            assert choice.plan in ladder and choice.plan != "sequential_cpu_offload", choice.reason
            faster = ladder[: ladder.index(choice.plan)]
            assert all(e.gpu_gib > budget for e in choice.estimates if e.plan in faster), (budget, choice.reason)

    def test_dry_run_plans_the_full_size_model_with_no_weights(self, full: FullSize, tmp_path):
        from batch_runner.cluster.cluster import join_cluster
        from batch_runner.run.dry_run import describe

        image = photo(tmp_path / "in.png")
        rows = [{"id": "a", "image": str(image), "prompt": "sea"}, {"id": "b", "image": str(image), "prompt": "car"}]
        manifest_path = write_manifest(tmp_path / "jobs.csv", rows)
        cfg = run_config(
            f"manifest={manifest_path}",
            f"model={full.name}",
            "dry_run=true",
            "memory.budget_gib=24",
            f"memory.host_budget_gib={full.host_budget_gib}",
        )
        check_settings(cfg)
        manifest = load_manifest(cfg.manifest, cfg.model, cfg.seed)
        assert manifest.problems == [] and len(manifest.jobs) == 2
        text = describe(cfg, manifest, join_cluster(cpu=True), tmp_path / "out")
        assert "memory plan: " in text and "2 to make" in text and "no model loaded" in text
        assert not (tmp_path / "out").exists()

    # --- rows -------------------------------------------------------------------------------------

    def test_a_row_the_model_cannot_make_is_refused_by_name(self, bad_row: BadRow, tmp_path):
        image = photo(tmp_path / "in.png")
        rows = [
            {"id": "ok", "image": str(image), "prompt": "sea"},
            {"id": "bad", "image": str(image), "prompt": "sea", **bad_row.columns},
        ]
        model = run_config("manifest=x", f"model={bad_row.config}").model
        manifest = load_manifest(write_manifest(tmp_path / "j.csv", rows), model, 0)
        assert [job.id for job in manifest.jobs] == ["ok"]
        [problem] = manifest.problems
        assert "'bad'" in str(problem) and bad_row.message in str(problem), str(problem)

    def test_a_last_image_is_refused_exactly_where_the_model_takes_no_last_frame(self, tiny: Tiny, tmp_path):
        image = photo(tmp_path / "in.png")
        rows = [{"id": "x", "image": str(image), "last_image": str(image), "prompt": "sea"}]
        model = run_config("manifest=x", f"model={tiny.name}").model
        manifest = load_manifest(write_manifest(tmp_path / "j.csv", rows), model, 0)
        if family_named(self.family).takes_last_image(model):
            assert manifest.problems == [] and manifest.jobs[0].last_image == str(image.resolve())
        else:
            [problem] = manifest.problems
            assert "last_image" in str(problem) and "first frame only" in str(problem), str(problem)

    # --- end to end, as a user runs it ------------------------------------------------------------

    @pytest.mark.slow
    def test_the_tiny_model_makes_every_row_in_one_process_and_in_two(self, tmp_path):
        """The one process test per family: every row made once, by one process and by two, the same
        videos, each of its row's shape, with the row's columns in the results."""
        if self.end_to_end is None:
            pytest.skip("this family runs end to end elsewhere (see its declaration)")
        config, overrides, rows = self.end_to_end
        first = photo(tmp_path / "in" / "first.png", (120, 80))
        photo(tmp_path / "in" / "last.png", (80, 120), seed=9)
        table_rows = [{"id": i, "image": str(first), **columns} for i, (columns, _) in rows.items()]
        manifest = write_manifest(tmp_path / "jobs.csv", table_rows)
        table, frames = made_by_one_process_and_by_two(tmp_path, manifest, f"model={config}", *overrides)
        for i, (columns, shape) in rows.items():
            assert frames[i].shape == (*shape, 3), i
            assert frames[i].shape[1:3] == (table.loc[i, "height"], table.loc[i, "width"]), i
            if "last_image" in columns:
                assert table.loc[i, "last_image"] == str((tmp_path / columns["last_image"]).resolve())
            for column, value in self.recorded.items():
                assert table.loc[i, column] == value, (i, column)
        assert not same_video(frames["a"], frames["c"])  # another seed and prompt
        if "ends" in rows:  # the last frame conditions the video: same seed and prompt, other frames
            assert not np.array_equal(frames["a"], frames["ends"])


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _other_value(family: Any, key: str, value: Any) -> Any:
    """A valid value of the option other than `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, float):
        return value / 2
    choices = typing.get_args(typing.get_type_hints(family.Options)[key])  # a Literal's values
    return next(v for v in choices if v != value)


def _video(
    family_name: str, model: Any, pipe: Any, row: tuple[int, int, int], tmp_path: Path, prompt: str | None = None
) -> torch.Tensor:
    """One guided row of two steps, the runner's way: prompts encoded beforehand, the family's arguments."""
    from .conftest import tiny_job

    family = family_named(family_name)
    frames, height, width = row
    job, _ = tiny_job(tmp_path, steps=2)
    job = replace(job, num_frames=frames, height=height, width=width, guidance_scale=3.0, prompt=prompt or job.prompt)
    images = {"image": load_image(job.image, height, width, 10**8), "last_image": None}
    texts = [job.prompt, job.negative_prompt]
    embeds = dict(zip(texts, family.encode_prompts(pipe, texts, model, torch.float32), strict=True))
    arguments = family.call_arguments(model, job, images, embeds)
    with torch.no_grad():
        return pipe(**arguments, generator=torch.Generator().manual_seed(1), output_type="pt").frames[0]


def _case_id(case: Any) -> str:
    if isinstance(case, BadRow):
        return "-".join([case.config, *map(str, case.columns.values())])
    return case.name


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each declaration's tiny configs, full-size configs and bad rows become the shared checks' cases."""
    cls = metafunc.cls
    for fixture, attribute in (("tiny", "tiny"), ("full", "full_size"), ("bad_row", "bad_rows")):
        if fixture in metafunc.fixturenames:
            cases = getattr(cls, attribute)
            ids = [
                c.name if hasattr(c, "name") else f"{c.config}-{'-'.join(map(str, c.columns.values()))}" for c in cases
            ]
            metafunc.parametrize(fixture, cases, ids=ids)


# --- the families ---------------------------------------------------------------------------------

T5 = frozenset({"text_encoder", "transformer", "vae"})
CLIP = T5 | {"image_encoder"}
EXPERTS = T5 | {"transformer_2"}
HUNYUAN = frozenset({"text_encoder", "text_encoder_2", "image_encoder", "transformer", "vae"})
KANDINSKY = frozenset({"text_encoder", "text_encoder_2", "transformer", "vae"})


class TestCogVideoX(FamilyContract):
    family = "cogvideox"
    tiny = (Tiny("tiny-cogvideox", T5, (9, 64, 96)),)
    full_size = (
        FullSize("cogvideox-5b-i2v", T5, 5.6, 42, 3072, ((49, 480, 720, 226), 13 * 30 * 45 + 226)),
        FullSize("cogvideox1.5-5b-i2v", T5, 5.6, 42, 3072, ((81, 768, 1360, 226), 11 * 48 * 85 + 226)),
    )
    bad_rows = (
        BadRow("tiny-cogvideox", {"num_frames": 12}, "8N+1 frames, 9 to 49, not 12; the nearest valid value is 9"),
        BadRow("tiny-cogvideox", {"width": 100}, "the nearest valid size is width=96 height=64"),
        BadRow("cogvideox-5b-i2v", {"width": 640}, "makes only 720x480 (width x height), not 640x480"),
    )
    guidance_batch = 2
    # Slices of the joint text and video sequence (a batch of two: each sample's rows are apart).
    copied_at_first_block = frozenset({"hidden_states", "encoder_hidden_states"})
    # test_cli.py runs tiny-cogvideox end to end with one process and two.


class TestWan(FamilyContract):
    family = "wan"
    tiny = (
        Tiny("tiny-wan", CLIP, (9, 32, 64)),
        Tiny("tiny-wan22", EXPERTS, (5, 32, 64)),
        Tiny("tiny-wan22-ti2v", T5, (5, 64, 64)),
    )
    # Parameters per transformer: Wan 2.1 I2V 16.4B (its image cross-attention included), each A14B
    # expert 14.3B, TI2V 5.0B. Tokens: 81 frames -> 21 latent frames; 480x832 -> 30x52 tokens of 2x2
    # latents of 8x8 pixels; the text stays out of the sequence. TI2V: 16x16 pixels per latent.
    full_size = (
        FullSize("wan2.1-i2v-14b-480p", CLIP, 16.4, 40, 5120, ((81, 480, 832, 512), 21 * 30 * 52)),
        FullSize("wan2.1-i2v-14b-720p", CLIP, 16.4, 40, 5120, ((81, 720, 1280, 512), 21 * 45 * 80)),
        FullSize("wan2.2-i2v-a14b", EXPERTS, 14.3, 40, 5120, ((81, 480, 832, 512), 21 * 30 * 52)),
        FullSize("wan2.2-ti2v-5b", T5, 5.0, 30, 3072, ((121, 704, 1280, 512), 31 * 22 * 40)),
    )
    bad_rows = (
        BadRow("tiny-wan", {"num_frames": 12}, "4N+1 frames, 5 to 81, not 12; the nearest valid value is 13"),
        BadRow("tiny-wan", {"width": 100}, "the nearest valid size is width=96 height=64"),
        BadRow("tiny-wan22-ti2v", {"width": 112}, "multiples of 32"),
        BadRow(
            "wan2.1-i2v-14b-480p", {"num_frames": 100}, "4N+1 frames, 5 to 81, not 100; the nearest valid value is 81"
        ),
    )
    guidance_batch = 1
    end_to_end = (
        "tiny-wan22",
        (),
        {
            "a": ({"prompt": "the sea at night", "seed": 1}, (9, 64, 96)),
            "b": ({"prompt": "a car in the city", "num_frames": 13}, (13, 64, 96)),
            "c": ({"prompt": "light on the water", "seed": 5}, (9, 64, 96)),
            "ends": ({"prompt": "the sea at night", "seed": 1, "last_image": "in/last.png"}, (9, 64, 96)),
        },
    )


class TestLTX(FamilyContract):
    family = "ltx"
    tiny = (Tiny("tiny-ltx", T5, (17, 64, 96)),)
    # 161 frames -> 21 latent frames; 512x768 -> 16x24 latents of 32x32 pixels, one token each; the
    # text stays out of the sequence. The T5-XXL encoder and 0.9.5's VAE (the 13B keeps it).
    full_size = tuple(
        FullSize(name, T5, b, blocks, hidden, ((161, 512, 768, 128), 21 * 16 * 24), {"text_encoder": 4.76, "vae": 1.25})
        for name, b, blocks, hidden in (
            ("ltx-video-2b-0.9.5", 1.9, 28, 2048),
            ("ltx-video-13b-0.9.7-dev", 13.0, 48, 4096),
        )
    )
    bad_rows = (
        BadRow(
            "tiny-ltx", {"num_frames": 12}, "tiny-ltx makes 8N+1 frames, 9 to 49, not 12; the nearest valid value is 9"
        ),
        BadRow(
            "ltx-video-2b-0.9.5",
            {"num_frames": 125},
            "ltx-video-2b-0.9.5 makes 8N+1 frames, 9 to 257, not 125; the nearest valid value is 129",
        ),
        BadRow(
            "ltx-video-13b-0.9.7-dev",
            {"num_frames": 100},
            "ltx-video-13b-0.9.7-dev makes 8N+1 frames, 9 to 257, not 100; the nearest valid value is 97",
        ),
        BadRow("tiny-ltx", {"width": 100}, "the nearest valid size is width=96 height=64"),
    )
    guidance_batch = 2
    end_to_end = (
        "tiny-ltx",
        ("output.crf=0",),
        {
            "a": ({"prompt": "the sea at night", "seed": 1}, (9, 64, 96)),
            "b": ({"prompt": "a car in the city", "num_frames": 17}, (17, 64, 96)),
            "c": ({"prompt": "light on the water", "seed": 5}, (9, 64, 96)),
        },
    )


class TestHunyuanVideo15(FamilyContract):
    family = "hunyuan15"
    tiny = (Tiny("tiny-hunyuan15", HUNYUAN, (9, 48, 80)),)
    # 121 frames -> 31 latent frames of 16x16 pixels, one token each; 1000 + 256 glyph + 729 image
    # tokens of text join the sequence. Qwen2.5-VL 7B's language model, SigLIP so400m.
    full_size = tuple(
        FullSize(
            name,
            HUNYUAN,
            8.3,
            54,
            2048,
            ((121, h, w, 1000), 31 * (h // 16) * (w // 16) + 1985),
            {"text_encoder": 7.07, "image_encoder": 0.43},
            budgets=(80.0, 141.0),
            host_budget_gib=200.0,
        )
        for name, h, w in (("hunyuanvideo1.5-i2v-480p", 480, 848), ("hunyuanvideo1.5-i2v-720p", 720, 1280))
    )
    bad_rows = (
        BadRow(
            "tiny-hunyuan15", {"num_frames": 12}, "makes 4N+1 frames, 5 to 121, not 12; the nearest valid value is 13"
        ),
        BadRow(
            "hunyuanvideo1.5-i2v-480p",
            {"num_frames": 100},
            "makes 4N+1 frames, 5 to 241, not 100; the nearest valid value is 101",
        ),
        BadRow(
            "tiny-hunyuan15",
            {"width": 96},
            "not 96x48 (width x height); for that aspect ratio it makes width=80 height=48",
        ),
        BadRow(
            "hunyuanvideo1.5-i2v-480p",
            {"width": 832, "height": 480},
            "not 832x480 (width x height); for that aspect ratio it makes width=816 height=480",
        ),
    )
    guidance_batch = 1
    fuses_qkv = False  # its attention modules are diffusers' older `Attention`, which fusing passes over
    # The rows make each bucket (the recorded size is the video's real size), with 64-pixel VAE tiles
    # recorded per row.
    end_to_end = (
        "tiny-hunyuan15",
        ("output.crf=0", "memory.vae_tile=64"),
        {
            "a": ({"prompt": "the sea at night", "seed": 1}, (9, 48, 80)),
            "b": ({"prompt": 'a sign that says "SEA"', "num_frames": 13, "height": 64, "width": 48}, (13, 64, 48)),
            "c": ({"prompt": "light on the water", "seed": 5, "height": 64, "width": 64}, (9, 64, 64)),
        },
    )
    recorded = {"vae_tile": 64}  # noqa: RUF012 (a declaration, never changed)


LTX2_PARTS = frozenset({"text_encoder", "connectors", "transformer", "vae", "audio_vae", "vocoder"})


class TestLTX2(FamilyContract):
    family = "ltx2"
    tiny = (Tiny("tiny-ltx2", LTX2_PARTS, (9, 64, 96)),)
    # 121 frames -> 16 latent frames; 512x768 -> 16x24 latents of 32x32 pixels, one token each; the
    # text (and the sound's 5 s x 25 latents) stays out of the video's sequence. Gemma 3 12B with its
    # vision tower; the connectors hold the 0.72B projection of Gemma's 49 stacked hidden states.
    full_size = tuple(
        FullSize(
            name,
            LTX2_PARTS,
            18.9,
            48,
            4096,
            ((121, 512, 768, 1024), 16 * 16 * 24),
            {"text_encoder": 12.19, "connectors": 1.43, "vae": 1.22},
            # At 12 GiB the streamed plan ran out of memory in the whole-frame decode (family.py), and
            # is estimated at ~12.6 GiB: only sequential offload fits there.
            budgets=(80.0, 48.0, 24.0, 16.0),
            host_budget_gib=200.0,
        )
        for name in ("ltx-2",)
    )
    bad_rows = (
        BadRow(
            "tiny-ltx2",
            {"num_frames": 12},
            "tiny-ltx2 makes 8N+1 frames, 9 to 49, not 12; the nearest valid value is 9",
        ),
        BadRow(
            "ltx-2", {"num_frames": 100}, "ltx-2 makes 8N+1 frames, 9 to 257, not 100; the nearest valid value is 97"
        ),
        BadRow("ltx-2", {"width": 700}, "the nearest valid size is width=704 height=512"),
    )
    guidance_batch = 3  # the guidance pair and the modality-isolated sample (guidance.py)
    fuses_qkv = False  # its processor reads to_q, to_k and to_v: streamline keeps diffusers from fusing them
    # tests/test_family_ltx2.py runs tiny-ltx2 end to end (two processes, with and without sound).


class TestSkyReelsV2(FamilyContract):
    family = "skyreels"
    tiny = (Tiny("tiny-skyreels", CLIP, (9, 32, 64)),)
    # Wan 2.1 I2V 14B's shape (16.4B with its image cross-attention). Tokens: 97 frames -> 25 latent
    # frames, 544x960 -> 34x60 tokens; 121 frames -> 31, 720x1280 -> 45x80; text out of the sequence.
    full_size = (
        FullSize("skyreels-v2-i2v-14b-540p", CLIP, 16.4, 40, 5120, ((97, 544, 960, 512), 25 * 34 * 60)),
        # 121 frames at 720P: by the estimate, only sequential offload fits 12 GiB.
        FullSize(
            "skyreels-v2-i2v-14b-720p",
            CLIP,
            16.4,
            40,
            5120,
            ((121, 720, 1280, 512), 31 * 45 * 80),
            budgets=(80.0, 48.0, 24.0, 16.0),
        ),
    )
    bad_rows = (
        BadRow(
            "tiny-skyreels",
            {"num_frames": 12},
            "tiny-skyreels makes 4N+1 frames, 5 to 81, not 12; the nearest valid value is 13",
        ),
        BadRow(
            "skyreels-v2-i2v-14b-540p",
            {"num_frames": 100},
            "skyreels-v2-i2v-14b-540p makes 4N+1 frames, 5 to 121, not 100; the nearest valid value is 101",
        ),
        BadRow("tiny-skyreels", {"width": 100}, "the nearest valid size is width=96 height=64"),
        BadRow("skyreels-v2-i2v-14b-720p", {"width": 1275}, "the nearest valid size is width=1280 height=720"),
    )
    guidance_batch = 1
    end_to_end = (
        "tiny-skyreels",
        (),
        {
            "a": ({"prompt": "the sea at night", "seed": 1}, (9, 64, 96)),
            "b": ({"prompt": "a car in the city", "num_frames": 13}, (13, 64, 96)),
            "c": ({"prompt": "light on the water", "seed": 5}, (9, 64, 96)),
        },
    )


class TestKandinsky5(FamilyContract):
    family = "kandinsky5"
    tiny = (Tiny("tiny-kandinsky5", KANDINSKY, (17, 32, 64)),)
    # Lite 2.0B, Pro 19.3B; Qwen2.5-VL 7B whole (8.29B with its vision tower), CLIP-L's text model.
    # 121 frames -> 31 latent frames; 512x768 -> 32x48 tokens of 2x2 latents of 8x8 pixels; the text
    # stays out of the sequence.
    full_size = tuple(
        FullSize(
            name,
            KANDINSKY,
            b,
            blocks,
            hidden,
            ((121, 512, 768, 256), 31 * 32 * 48),
            {"text_encoder": 8.29, "text_encoder_2": 0.123},
        )
        for name, b, blocks, hidden in (
            ("kandinsky5-i2v-lite-5s", 2.0, 32, 1792),
            ("kandinsky5-i2v-pro-5s", 19.3, 60, 4096),
        )
    )
    bad_rows = (
        BadRow(
            "tiny-kandinsky5",
            {"num_frames": 9},
            "tiny-kandinsky5 makes 4N+1 frames, 17 to 49, not 9; the nearest valid value is 17",
        ),
        BadRow(
            "kandinsky5-i2v-lite-5s",
            {"num_frames": 100},
            "kandinsky5-i2v-lite-5s makes 4N+1 frames, 17 to 121, not 100; the nearest valid value is 101",
        ),
        BadRow("tiny-kandinsky5", {"width": 100}, "the nearest valid size is width=96 height=64"),
    )
    guidance_batch = 1
    fuses_qkv = False  # its projections are named to_query/to_key/to_value, which diffusers' fusing misses
    end_to_end = (
        "tiny-kandinsky5",
        (),
        {
            "a": ({"prompt": "the sea at night", "seed": 1}, (17, 64, 96)),
            "b": ({"prompt": "a car in the city", "num_frames": 21}, (21, 64, 96)),
            "c": ({"prompt": "light on the water", "seed": 5}, (17, 64, 96)),
        },
    )


class TestCosmosPredict25(FamilyContract):
    family = "cosmos"
    tiny = (Tiny("tiny-cosmos", T5, (9, 32, 64)),)
    # 2B 2.06B, 14B 14.37B; Cosmos-Reason1-7B (Qwen2.5-VL 7B, 8.29B with its vision tower). 93 frames
    # -> 24 latent frames; 704x1280 -> 44x80 tokens of 2x2 latents of 8x8 pixels; the text stays out.
    # Its steps' activations grow with the width: the 2B's measured 30/27 bytes per token and width
    # (family.py) are ~12 GiB for the 14B, so at 12 GiB only sequential offload fits it (an estimate:
    # not run).
    full_size = tuple(
        FullSize(
            name, T5, b, blocks, hidden, ((93, 704, 1280, 512), 24 * 44 * 80), {"text_encoder": 8.29}, budgets=budgets
        )
        for name, b, blocks, hidden, budgets in (
            ("cosmos-predict2.5-2b", 2.06, 28, 2048, BUDGETS),
            ("cosmos-predict2.5-14b", 14.37, 36, 5120, (80.0, 48.0, 24.0, 16.0)),
        )
    )
    bad_rows = (
        BadRow(
            "tiny-cosmos",
            {"num_frames": 12},
            "tiny-cosmos makes 4N+1 frames, 5 to 49, not 12; the nearest valid value is 13",
        ),
        BadRow(
            "cosmos-predict2.5-2b",
            {"num_frames": 100},
            "cosmos-predict2.5-2b makes 4N+1 frames, 5 to 93, not 100; the nearest valid value is 93",
        ),
        BadRow("tiny-cosmos", {"width": 100}, "the nearest valid size is width=96 height=64"),
    )
    guidance_batch = 1
    fuses_qkv = False  # its transformer has no fuse_qkv_projections (no diffusers AttentionMixin)
    end_to_end = (
        "tiny-cosmos",
        (),
        {
            "a": ({"prompt": "the sea at night", "seed": 1}, (9, 64, 96)),
            "b": ({"prompt": "a car in the city", "num_frames": 13}, (13, 64, 96)),
            "c": ({"prompt": "light on the water", "seed": 5}, (9, 64, 96)),
        },
    )


# --- the interface itself -------------------------------------------------------------------------

CONTRACTS = (
    TestCogVideoX,
    TestWan,
    TestLTX,
    TestHunyuanVideo15,
    TestLTX2,
    TestSkyReelsV2,
    TestKandinsky5,
    TestCosmosPredict25,
)


def test_every_family_module_has_a_contract():
    assert sorted(c.family for c in CONTRACTS) == sorted(FAMILY_MODULES)


def test_no_module_outside_the_families_names_a_model_class():
    pattern = re.compile(
        r"(CogVideoX|Wan|LTX|HunyuanVideo|SkyReels|Kandinsky|Cosmos)[A-Za-z0-9_]*(Pipeline|Transformer3DModel|Scheduler|Autoencoder)"
    )
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "batch_runner").rglob("*.py")
        if "families" not in path.parts and pattern.search(path.read_text())
    ]
    assert offenders == []


def test_no_module_outside_the_families_names_a_family_only_option():
    options = {f.name for name in FAMILY_MODULES for f in dataclasses.fields(family_named(name).Options)}
    assert options  # the families have some
    pattern = re.compile(r"\b(" + "|".join(sorted(options)) + r")\b")
    offenders = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for folder in ("batch_runner", "scripts")
        for path in (ROOT / folder).rglob("*.py")
        if "families" not in path.parts
        for match in [pattern.search(path.read_text())]
        if match
    ]
    assert offenders == []


def test_the_quickstarts_alias_is_tiny_cogvideox():
    assert run_config("manifest=x", "model=tiny").model.name == "tiny-cogvideox"
