"""LTX-2 makes sound: the MP4 of each row carries it as an AAC track as long as the video, the results
say so, the report plays it, and output.audio=false makes silent videos without decoding it. A step's
guidance passes run as one forward (guidance.py) and make diffusers' video and sound."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import av
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from batch_runner.families import family_named
from batch_runner.inputs.images import load_image
from batch_runner.inputs.manifest import load_manifest
from batch_runner.replica.pipeline import build_pipeline

from .browser import CHROMIUM, await_in_chromium
from .conftest import accelerate_cpu, assert_both_ranks_took_part, ok, photo, run_cli, run_config, write_manifest

ROWS = {"a": {"prompt": "the sea at night", "seed": 1}, "b": {"prompt": "a car in the city", "num_frames": 17}}


def streams(path: Path) -> list[tuple[str, str, float]]:
    """(kind, codec, seconds) of every stream of an MP4, as ffprobe shows them."""
    with av.open(str(path)) as container:
        return [(s.type, s.codec_context.name, float(s.duration * s.time_base)) for s in container.streams]


def manifest_of(tmp_path: Path) -> Path:
    image = photo(tmp_path / "in" / "first.png", (120, 80))
    return write_manifest(tmp_path / "jobs.csv", [{"id": i, "image": str(image), **c} for i, c in ROWS.items()])


@pytest.fixture(scope="module")
def with_sound(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rows made with their sound by two processes (accelerate --cpu): the output folder."""
    folder = tmp_path_factory.mktemp("ltx2")
    out = folder / "out"
    launcher = accelerate_cpu(2)
    ok(
        run_cli(
            f"manifest={manifest_of(folder)}", "model=tiny-ltx2", f"output_dir={out}", launcher=launcher, cwd=folder
        )
    )
    return out


@pytest.mark.slow
def test_two_processes_make_every_row_with_a_sound_track_as_long_as_the_video(with_sound):
    out = with_sound
    table = pd.read_parquet(out / "results.parquet").set_index("id")
    assert set(table["status"]) == {"ok"}
    assert_both_ranks_took_part(out, set(table["rank"]))
    for row_id, frames in (("a", 9), ("b", 17)):
        [(video, h264, video_seconds), (audio, aac, audio_seconds)] = streams(out / "videos" / f"{row_id}.mp4")
        assert (video, h264, audio, aac) == ("video", "h264", "audio", "aac")
        assert video_seconds == pytest.approx(frames / 8)
        assert abs(audio_seconds - video_seconds) <= 1 / 8, row_id  # within one frame
        assert bool(table.loc[row_id, "has_audio"]) and table.loc[row_id, "audio_sample_rate"] == 8000
    metadata = pd.read_parquet(out / "metadata.parquet").set_index("id")
    assert metadata["has_audio"].all() and set(metadata["audio_sample_rate"]) == {8000}
    page = (out / "report.html").read_text()
    assert page.count("<video class='player' controls") == 2 and "muted" not in page


@pytest.mark.slow  # two rows of the tiny LTX-2 in this process: not quick
def test_output_audio_false_makes_videos_without_a_sound_track(tmp_path):
    """In-process (the runner as run.py calls it): the command line is the fixture's, with the sound."""
    from batch_runner.run import runner

    manifest = manifest_of(tmp_path)
    out = tmp_path / "out"
    assert (
        runner.run(run_config(f"manifest={manifest}", "model=tiny-ltx2", f"output_dir={out}", "output.audio=false"))
        == 0
    )
    table = pd.read_parquet(out / "results.parquet").set_index("id")
    assert set(table["status"]) == {"ok"}
    for row_id in ROWS:
        assert [kind for kind, _, _ in streams(out / "videos" / f"{row_id}.mp4")] == ["video"]
        assert not table.loc[row_id, "has_audio"] and pd.isna(table.loc[row_id, "audio_sample_rate"])
    assert "<video" not in (out / "report.html").read_text()


# Plays the report's first video to its end; the promise holds what Chromium decoded of each stream.
PROBE = """<!doctype html><html><body><video id=v src='{src}' autoplay></video><script>
const v = document.getElementById('v');
window.played = new Promise((resolve, reject) => {{
  v.addEventListener('ended', () => resolve(
    {{audio: v.webkitAudioDecodedByteCount, video: v.webkitVideoDecodedByteCount, duration: v.duration}}));
  v.addEventListener('error', () => reject(new Error('error ' + v.error.code + ' ' + v.error.message)));
}});
</script></body></html>"""


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_chromium_plays_the_reports_video_with_its_sound(with_sound, tmp_path):
    sources = re.findall(
        r"<video class='player' controls preload='metadata' src='([^']+)'>", (with_sound / "report.html").read_text()
    )
    [src] = [s for s in sources if s.endswith("a.mp4")]  # row a: 9 frames
    (with_sound / "probe.html").write_text(PROBE.format(src=src))
    # Awaits the page's promise (played to the end, or an error), not a time budget: see browser.py.
    decoded = await_in_chromium((with_sound / "probe.html").as_uri(), "window.played", tmp_path / "profile")
    assert decoded["audio"] > 0 and decoded["video"] > 0 and decoded["duration"] == pytest.approx(9 / 8)


def test_without_audio_the_pipeline_skips_the_sound_decode_and_puts_it_back_after(tmp_path, monkeypatch):
    cfg = run_config("manifest=x", "model=tiny-ltx2")
    family, pipe = family_named("ltx2"), build_pipeline(cfg.model)
    image = photo(tmp_path / "in.png", (96, 64))
    rows = [{"image": str(image), "prompt": "sea", "num_inference_steps": 2}]
    [job] = load_manifest(write_manifest(tmp_path / "j.csv", rows), cfg.model, 0).jobs
    texts = [job.prompt, job.negative_prompt]
    embeds = dict(zip(texts, family.encode_prompts(pipe, texts, cfg.model, torch.float32), strict=True))
    arguments = family.call_arguments(cfg.model, job, {"image": load_image(job.image, 64, 96, 10**8)}, embeds)
    vocoded = []
    vocode = type(pipe.vocoder).forward
    monkeypatch.setattr(type(pipe.vocoder), "forward", lambda self, *a, **k: vocoded.append(1) or vocode(self, *a, **k))
    with torch.no_grad():
        with family.audio_skipped(pipe):
            silent = pipe(**arguments, generator=torch.Generator().manual_seed(0))
        assert family.audio_track(pipe, silent) is None and vocoded == []
        loud = pipe(**arguments, generator=torch.Generator().manual_seed(0), output_type="pt")
    samples, rate = family.audio_track(pipe, loud)
    assert vocoded == [1] and rate == 8000 and samples.shape[0] == 2
    assert "decode" not in pipe.audio_vae.__dict__ and "forward" not in pipe.vocoder.__dict__


@pytest.fixture(scope="module")
def tiled_vae() -> tuple:
    """The tiny LTX-2's VAE as the family finishes it, tiled as LTX-2's real one (16-latent tiles 14
    apart), and diffusers' own tiled decode of it."""
    vae = build_pipeline(run_config("manifest=x", "model=tiny-ltx2").model).vae
    ratio = vae.spatial_compression_ratio
    vae.enable_tiling(
        tile_sample_min_height=16 * ratio,
        tile_sample_min_width=16 * ratio,
        tile_sample_stride_height=14 * ratio,
        tile_sample_stride_width=14 * ratio,
    )
    return vae, type(vae).tiled_decode.__get__(vae)


def test_a_side_of_14k_plus_1_latents_decodes_in_tiles(tiled_vae):
    """480 pixels are 15 latents: diffusers' tiles leave the last one latent wide, which LTX-2's
    reflect padding refuses; the finished VAE shortens that side's stride for the call."""
    vae, diffusers_decode = tiled_vae
    z = torch.randn(1, vae.config.latent_channels, 2, 15, 29, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="Padding size should be less than"):
        diffusers_decode(z, None)
    with torch.no_grad():
        frames = vae.tiled_decode(z, None).sample
    ratio = vae.spatial_compression_ratio
    assert frames.shape[-2:] == (15 * ratio, 29 * ratio) and torch.isfinite(frames).all()
    assert (vae.tile_sample_stride_height, vae.tile_sample_stride_width) == (14 * ratio, 14 * ratio)


def test_other_sides_decode_in_diffusers_own_tiles_bit_for_bit(tiled_vae):
    vae, diffusers_decode = tiled_vae
    z = torch.randn(1, vae.config.latent_channels, 2, 16, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(vae.tiled_decode(z, None).sample, diffusers_decode(z, None).sample)


@given(latents=st.integers(2, 2000), stride=st.integers(2, 64))
def test_the_stride_is_the_longest_up_to_the_vaes_that_leaves_no_one_latent_tile(latents, stride):
    """Tiles start every `stride` latents from 0: a side ends in a one-latent tile where
    latents % stride == 1. With LTX-2's 14 some shorter stride always avoids it (every stride from 2
    to 14 would have to divide latents - 1: 360360 divides it first); where none can, the VAE's own."""
    from batch_runner.families.ltx2.family import _stride_without_sliver

    chosen = _stride_without_sliver(latents, stride)
    assert 2 <= chosen <= stride
    assert all(latents % longer == 1 for longer in range(chosen + 1, stride + 1))
    if stride >= 14:
        assert latents % chosen != 1
    if latents % chosen == 1:
        assert chosen == stride and all(latents % shorter == 1 for shorter in range(2, stride))


def test_a_text_cached_without_its_padding_makes_the_video_and_sound_of_the_padded_one():
    """The replica caches Gemma's stacked hidden states of the real tokens only, on the host; padded
    again for the row, they make what diffusers makes from the prompt itself."""
    cfg = run_config("manifest=x", "model=tiny-ltx2")
    family, pipe = family_named("ltx2"), build_pipeline(cfg.model)
    image = Image.new("RGB", (96, 64), (200, 100, 50))
    common = {"image": image, "height": 64, "width": 96, "num_frames": 9, "frame_rate": 8.0, "guidance_scale": 3.0}
    common |= {"num_inference_steps": 2, "output_type": "pt", "max_sequence_length": cfg.model.max_sequence_length}
    with torch.no_grad():
        cached, cached_negative = family.encode_prompts(pipe, ["the sea", ""], cfg.model, torch.float32)
        assert cached.tokens.device.type == "cpu" and cached.tokens.shape[0] < cfg.model.max_sequence_length
        own = pipe(prompt="the sea", negative_prompt="", generator=torch.Generator().manual_seed(0), **common)
        (prompt, mask), (negative, negative_mask) = cached.padded(), cached_negative.padded()
        ours = pipe(
            prompt_embeds=prompt,
            prompt_attention_mask=mask,
            negative_prompt_embeds=negative,
            negative_prompt_attention_mask=negative_mask,
            generator=torch.Generator().manual_seed(0),
            **common,
        )
    torch.testing.assert_close(ours.frames, own.frames, rtol=0, atol=0)
    torch.testing.assert_close(ours.audio, own.audio, rtol=0, atol=0)


def test_texts_are_encoded_a_few_a_pass_without_the_heads_logits_as_diffusers_encodes_them(monkeypatch):
    """A chunk's texts go through Gemma `TEXTS_PER_PASS` at a time, its head making the last
    position's logits only (diffusers' call makes them at every position and reads none); each text
    comes out as diffusers' own `encode_prompt` of all of them at once makes it, and the instance's
    forward is put back."""
    cfg = run_config("manifest=x", "model=tiny-ltx2")
    family, pipe = family_named("ltx2"), build_pipeline(cfg.model)
    texts = ["the sea", "a red car in the rain", "", "night", "a dog runs after a ball on a beach"]
    passes, positions = [], []
    hooks = [
        pipe.text_encoder.register_forward_pre_hook(
            lambda module, args, kwargs: passes.append(len(kwargs["input_ids"])) or None, with_kwargs=True
        ),
        pipe.text_encoder.lm_head.register_forward_pre_hook(lambda module, args: positions.append(args[0].shape[1])),
    ]
    with torch.no_grad():
        ours = family.encode_prompts(pipe, texts, cfg.model, torch.float32)
        assert "forward" not in pipe.text_encoder.__dict__
        assert passes == [2, 2, 1] and positions == [1, 1, 1]
        embedded, masks, _, _ = pipe.encode_prompt(
            prompt=texts, do_classifier_free_guidance=False, max_sequence_length=cfg.model.max_sequence_length
        )
    for hook in hooks:
        hook.remove()
    assert positions[-1] == cfg.model.max_sequence_length  # diffusers' own call: every position
    for text, e, m in zip(ours, embedded, masks, strict=True):
        torch.testing.assert_close(text.tokens, e[m.bool()], rtol=0, atol=1e-6)
        assert torch.equal(text.mask, m)


def test_a_saved_ltx2_pipeline_s_components_are_built_empty_from_their_configs(tmp_path):
    """Host sharing builds each shared component on the meta device from the saved folder: the
    connectors and the vocoder are classes of diffusers' LTX-2 pipeline module, saved as `ltx2`."""
    from batch_runner.replica.pipeline import empty_component

    cfg = run_config("manifest=x", "model=tiny-ltx2")
    build_pipeline(cfg.model).save_pretrained(tmp_path / "saved")
    family = family_named("ltx2")
    for name in family.roles:
        module = empty_component(family, str(tmp_path / "saved"), name, torch.float32, None)
        assert all(p.is_meta for p in module.parameters()), name


def test_a_frame_count_ltx2_cannot_make_is_refused_naming_the_nearest(tmp_path):
    image = photo(tmp_path / "in.png")
    model = run_config("manifest=x", "model=ltx-2").model
    rows = [{"id": "bad", "image": str(image), "prompt": "sea", "num_frames": 120}]
    [problem] = load_manifest(write_manifest(tmp_path / "j.csv", rows), model, 0).problems
    assert "ltx-2 makes 8N+1 frames, 9 to 257, not 120; the nearest valid value is 121" in str(problem)


def test_one_denoising_step_is_refused_for_ltx2_naming_the_fewest_it_runs(tmp_path):
    """diffusers' LTX-2 scheduler fails at 1 step (IndexError): refused up front, not a failed row."""
    image = photo(tmp_path / "in.png")
    model = run_config("manifest=x", "model=tiny-ltx2").model
    rows = [{"id": "one", "image": str(image), "prompt": "sea", "num_inference_steps": 1}]
    rows += [{"id": "two", "image": str(image), "prompt": "sea", "num_inference_steps": 2}]
    [problem] = load_manifest(write_manifest(tmp_path / "j.csv", rows), model, 0).problems
    assert "'one'" in str(problem) and "num_inference_steps" in str(problem)
    assert "runs at least 2 denoising steps, not 1; the nearest valid value is 2" in str(problem)


# --- a step's guidance passes in one forward (batch_runner/families/ltx2/guidance.py) ---


def _guided_video(pipe, model, job, images, embeds, **extra) -> tuple[object, list[int]]:
    """A row's video and sound, and the batch of every forward the transformer's first block ran."""
    batches = []
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]) or None, with_kwargs=True
    )
    arguments = family_named("ltx2").call_arguments(model, job, images, embeds) | extra
    try:
        with torch.no_grad():
            output = pipe(**arguments, generator=torch.Generator().manual_seed(job.seed), output_type="pt")
    finally:
        hook.remove()
    return output, batches


def _ltx2_row(tmp_path, guidance_scale: float = 6.0):
    from dataclasses import replace

    from .conftest import tiny_job

    model = run_config("manifest=x", "model=tiny-ltx2").model
    pipe = build_pipeline(model)
    job, images = tiny_job(tmp_path, steps=3)
    job = replace(job, guidance_scale=guidance_scale)
    texts = [job.prompt, job.negative_prompt]
    embeds = dict(zip(texts, family_named("ltx2").encode_prompts(pipe, texts, model, torch.float32), strict=True))
    return model, pipe, job, images, embeds


def _same_video(ours, stock) -> None:
    """The same frames and sound, to the kernels' rounding between batch sizes (fp32)."""
    torch.testing.assert_close(ours.frames, stock.frames, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.audio, stock.audio, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("guidance_scale", "stock_step", "step"), [(6.0, [2, 1, 1], [3]), (1.0, [1, 1, 1], [2])])
def test_a_steps_guidance_passes_in_one_forward_make_diffusers_video_and_sound(
    tmp_path, monkeypatch, guidance_scale, stock_step, step
):
    """diffusers runs the guidance pair (unguided: the conditional pass), then STG and modality
    isolation as forwards of their own; streamline's transformer runs one forward a step, the
    isolated sample in it, and makes the same video and sound. With the isolated sample's
    cross-modal attention left on, the frames are not diffusers'."""
    from batch_runner.families.ltx2 import guidance

    model, pipe, job, images, embeds = _ltx2_row(tmp_path, guidance_scale)
    stock, stock_forwards = _guided_video(pipe, model, job, images, embeds)
    family_named("ltx2").streamline(pipe.transformer, model)
    assert type(pipe.transformer) is guidance.GuidanceBatchedLTX2
    ours, forwards = _guided_video(pipe, model, job, images, embeds)
    assert stock_forwards == stock_step * 3 and forwards == step * 3
    _same_video(ours, stock)

    def not_switched(self, *args, **kwargs):
        return super(guidance.Isolating, self).__call__(*args, **kwargs)

    monkeypatch.setattr(guidance.Isolating, "__call__", not_switched)
    not_isolated, _ = _guided_video(pipe, model, job, images, embeds)
    assert not torch.allclose(not_isolated.frames, stock.frames, atol=1e-3)


def test_blocks_that_perturb_their_attention_keep_a_real_stg_pass(tmp_path):
    """LTX-2.3's blocks (`perturbed_attn`) do skip the STG blocks' self-attention: that pass runs as
    its own forward, modality isolation still joins the first, and the video is diffusers'."""
    from diffusers import LTX2VideoTransformer3DModel

    model, pipe, job, images, embeds = _ltx2_row(tmp_path)
    config = {k: v for k, v in pipe.transformer.config.items() if k != "_use_default_values"}
    perturbing = LTX2VideoTransformer3DModel.from_config(config | {"perturbed_attn": True})
    assert all(block.perturbed_attn for block in perturbing.transformer_blocks)
    perturbing.load_state_dict(pipe.transformer.state_dict())
    pipe.transformer = perturbing.eval()
    stg = {"spatio_temporal_guidance_blocks": [1]}
    stock, stock_forwards = _guided_video(pipe, model, job, images, embeds, **stg)
    family_named("ltx2").streamline(pipe.transformer, model)
    ours, forwards = _guided_video(pipe, model, job, images, embeds, **stg)
    assert stock_forwards == [2, 1, 1] * 3 and forwards == [3, 1] * 3
    _same_video(ours, stock)
    unperturbed, _ = _guided_video(pipe, model, job, images, embeds)
    assert not torch.allclose(unperturbed.frames, stock.frames, atol=1e-3)  # the STG pass does count here


def test_compiled_blocks_take_the_isolated_sample_as_an_input_not_a_constant(tmp_path):
    """The per-sample switch is read inside the compiled blocks: one graph serves every step, and the
    frames are still diffusers' (a switch baked in as a constant, or ignored, would differ)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, pipe, job, images, embeds = _ltx2_row(tmp_path)
    stock, _ = _guided_video(pipe, model, job, images, embeds)
    family_named("ltx2").streamline(pipe.transformer, model)
    torch._dynamo.reset()
    counters.clear()
    for block in pipe.transformer.transformer_blocks:
        block.forward = torch.compile(block.forward, dynamic=False, backend="aot_eager")
    try:
        for _ in range(2):
            ours, _ = _guided_video(pipe, model, job, images, embeds)
            _same_video(ours, stock)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()


def test_a_pass_whose_inputs_differ_from_the_first_forwards_runs_its_own_forward(tmp_path):
    """A served pass is checked against the inputs it was made from: other latents get a forward of
    their own, the stock model's answer."""
    import copy

    model, pipe, job, images, embeds = _ltx2_row(tmp_path)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw) or None, with_kwargs=True)
    _guided_video(pipe, model, job, images, embeds)
    hook.remove()
    first, isolated = calls[0], calls[2]
    assert first["hidden_states"].shape[0] == 2 and isolated["isolate_modalities"]
    stock = pipe.transformer
    ours = copy.deepcopy(stock)
    family_named("ltx2").streamline(ours, model)
    other = isolated | {"hidden_states": isolated["hidden_states"] + 1}
    with torch.no_grad():
        expected = {name: stock(**kwargs)[0] for name, kwargs in (("isolated", isolated), ("other", other))}
        ours(**first)
        torch.testing.assert_close(ours(**other)[0], expected["other"], rtol=0, atol=1e-5)
        ours(**first)
        torch.testing.assert_close(ours(**isolated)[0], expected["isolated"], rtol=0, atol=1e-5)
    assert not torch.allclose(expected["other"], expected["isolated"])


def test_a_served_pass_matches_only_inputs_equal_in_every_element_shape_and_dtype():
    from batch_runner.families.ltx2.guidance import Served

    made = {"hidden_states": torch.randn(1, 6, 4), "timestep": torch.tensor([0.5]), "audio_sigma": torch.rand(1)}
    served = Served({k: v.clone() for k, v in made.items()}, (torch.zeros(1), torch.zeros(1)))
    assert served.matches(made | {"return_dict": False, "attention_kwargs": None})
    for name, tensor in made.items():
        changed = tensor.clone()
        changed.view(-1)[-1] += 1  # one element of one input
        assert not served.matches(made | {name: changed}), name
        assert not served.matches(made | {name: tensor.double()}), name
        assert not served.matches(made | {name: torch.cat([tensor, tensor])}), name
    assert not served.matches({k: v for k, v in made.items() if k != "timestep"})
    assert not served.matches(made | {"hidden_states": made["hidden_states"].clone().fill_(float("nan"))})


def test_without_stg_or_modality_isolation_the_transformer_stays_diffusers():
    """The distilled preset runs neither pass: there is nothing to batch."""
    from diffusers import LTX2VideoTransformer3DModel

    cfg = run_config("manifest=x", "model=tiny-ltx2", "model.options.stg_scale=0", "model.options.modality_scale=1")
    transformer = build_pipeline(cfg.model).transformer
    family_named("ltx2").streamline(transformer, cfg.model)
    assert type(transformer) is LTX2VideoTransformer3DModel


@pytest.mark.parametrize(
    ("guided", "modality_scale", "batch"),
    [(True, 3.0, 3), (False, 3.0, 2), (True, 1.0, 2), (False, 1.0, 1)],
)
def test_the_planner_sizes_a_step_by_the_samples_its_one_forward_takes(guided, modality_scale, batch):
    """guidance.py appends the modality-isolated sample to the step's forward whether or not the row
    is guided: an unguided row that isolates still runs 2 samples, and the planner charges them."""
    from batch_runner.replica import planner
    from batch_runner.replica.anatomy import anatomy

    cfg = run_config("manifest=x", "model=ltx-2", f"model.options.modality_scale={modality_scale}")
    model = anatomy(cfg.model)
    shape = planner.Shape(cfg.model.num_frames, cfg.model.height, cfg.model.width, guided=guided)
    workload = planner.shape_workload(cfg, model, shape)
    assert workload.batch == batch
    denoise = planner.activation_gib(workload, model.family.activations, True, False)[0]
    single = planner.activation_gib(replace(workload, batch=1), model.family.activations, True, False)[0]
    assert denoise == pytest.approx(batch * single)
