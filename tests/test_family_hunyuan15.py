"""What only HunyuanVideo-1.5 does: sizes as the pipeline's buckets, guidance as a component, four
cached tensors per prompt, attention without the text's padding, smaller VAE tiles for smaller
budgets. The shared checks of every family are in test_family_contract.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from batch_runner.errors import UserError
from batch_runner.families import family_named
from batch_runner.families.hunyuan15.buckets import bucket_for, buckets, crop_sizes, nearest_bucket
from batch_runner.replica import placement, planner, speed
from batch_runner.replica.anatomy import anatomy
from batch_runner.replica.pipeline import build_pipeline
from batch_runner.replica.planner import auto_plan, workload_of
from batch_runner.run.checks import check_settings

from .conftest import (
    run_config,
    tiny_job,
)

TINY = "tiny-hunyuan15"
FULL = ("hunyuanvideo1.5-i2v-480p", "hunyuanvideo1.5-i2v-720p")


def _made(cfg, job, images, fuse: bool = False) -> torch.Tensor:
    """A video the runner's way: its changes to the transformer, prompts encoded beforehand."""
    family = family_named("hunyuan15")
    pipe = build_pipeline(cfg.model)
    family.streamline(pipe.transformer, cfg.model)
    if fuse:
        speed.fuse_qkv(pipe.transformer)
    texts = [job.prompt, job.negative_prompt]
    embeds = dict(zip(texts, family.encode_prompts(pipe, texts, cfg.model, torch.float32), strict=True))
    arguments = family.call_arguments(cfg.model, job, images, embeds)
    with torch.no_grad():
        return pipe(**arguments, generator=torch.Generator().manual_seed(1), output_type="pt").frames[0]


# --- the family -----------------------------------------------------------------------------------


def test_tiny_hunyuan_has_a_guider_and_a_chat_template():
    """Guidance is a component here, and the language model reads the prompt through a chat template."""
    pipe = build_pipeline(run_config("manifest=x", f"model={TINY}").model)
    assert pipe.guider is not None and pipe.tokenizer.chat_template


def test_cached_embeddings_make_the_video_the_pipeline_makes_from_text(tmp_path):
    """Our path (prompts encoded once per chunk, four tensors each) against the pipeline encoding the
    texts itself, guided, with text in quotes for the glyph encoder; fusing QKV changes nothing."""
    cfg = run_config("manifest=x", f"model={TINY}")
    job, _ = tiny_job(tmp_path, steps=2)
    job = replace(job, prompt='a sign that says "SEA"', height=48, width=80)
    from batch_runner.inputs.images import load_image

    images = {"image": load_image(job.image, job.height, job.width, 10**8), "last_image": None}
    ours = _made(cfg, job, images)
    assert ours.shape == (9, 3, 48, 80)
    pipe = build_pipeline(cfg.model)
    arguments = family_named("hunyuan15").call_arguments(cfg.model, job, images, {job.prompt: None, "": None})
    with torch.no_grad():
        reference = pipe(
            **arguments,
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            generator=torch.Generator().manual_seed(1),
            output_type="pt",
        ).frames[0]
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(_made(cfg, job, images, fuse=True), ours)


def test_the_guidance_scale_of_a_row_reaches_the_guider(tmp_path):
    cfg = run_config("manifest=x", f"model={TINY}")
    job, images = tiny_job(tmp_path, steps=2)
    job = replace(job, height=48, width=80)
    from batch_runner.inputs.images import load_image

    images = {"image": load_image(job.image, 48, 80, 10**8)}
    guided = _made(cfg, replace(job, guidance_scale=6.0), images)
    other = _made(cfg, replace(job, guidance_scale=2.0), images)
    plain = _made(cfg, replace(job, guidance_scale=1.0), images)
    assert not torch.allclose(guided, other) and not torch.allclose(guided, plain)


def test_every_bucket_is_a_size_the_pipeline_makes_from_an_image_of_that_size():
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=16)
    for target in (64, 640, 960):
        for h, w in buckets(target):
            assert processor.calculate_default_height_width(h, w, target) == (h, w)
    # 16:9 at 480p and 720p; a ratio between buckets goes where the pipeline sends it.
    assert (480, 848) in buckets(640) and (720, 1280) in buckets(960)
    assert nearest_bucket(480, 832, 640) == (480, 816)


def test_the_copied_bucket_rule_gives_the_size_the_pipeline_gives_for_images_of_every_shape():
    """buckets.py copies diffusers' rule, so that checking a row imports no diffusers: the copy must
    answer as the pipeline's own image processor does, at every configured resolution."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import (
        HunyuanVideo15ImageProcessor,
        generate_crop_size_list,
    )

    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=16)
    for target in (64, 640, 960):
        assert list(crop_sizes(target)) == generate_crop_size_list(target, 16)
        for height in range(16, 2400, 149):
            for width in (*range(16, 2400, 131), height, 2 * height, height // 2 + 1):
                made = tuple(processor.calculate_default_height_width(height, width, target))
                assert bucket_for(height, width, target) == made, (height, width, target)


@pytest.mark.parametrize("name", FULL)
def test_the_plan_without_offloading_needs_the_weights_and_the_decode(name):
    """The weights alone (bf16): 17.3 GB of encoders, 16.7 transformer, 2.5 VAE; the decode's reserve above."""
    cfg = run_config("manifest=x", f"model={name}", "memory.host_budget_gib=200")
    none = next(e for e in auto_plan(cfg, 141.0, 1).estimates if e.plan == "none")
    assert 34 < none.gpu_gib < 100


@pytest.mark.parametrize(
    ("budget", "plan", "tile"),
    [
        (79.0, "none", None),  # a whole H100: the VAE's own 256-pixel tiles
        (48.0, "none", 128),
        (40.0, "text_offload", 128),
        (24.0, "group_offload", 128),  # an RTX 4090
        (16.0, "group_offload", 128),
        (12.0, "group_offload", 128),
    ],
)
def test_a_smaller_budget_decodes_in_smaller_tiles_before_it_streams_more(budget, plan, tile):
    """The 256-pixel tiles decode all 121 frames of a tile at once (~14 GiB at 480p): below a whole
    card the planner decodes 128-pixel tiles (a quarter of that) rather than step down a plan."""
    cfg = run_config("manifest=x", f"model={FULL[0]}", "memory.host_budget_gib=200")
    choice = auto_plan(cfg, budget, 1)
    assert (choice.plan, choice.vae_tile) == (plan, tile)
    chosen = next(e for e in choice.estimates if e.plan == plan)
    assert chosen.gpu_gib <= budget
    assert ("with 128-pixel VAE tiles" in choice.reason) == (tile == 128)


def test_a_budget_below_every_plan_is_refused_with_the_smaller_tiles_counted():
    cfg = run_config("manifest=x", f"model={FULL[0]}", "memory.host_budget_gib=200")
    with pytest.raises(UserError, match=r"No memory plan fits: none needs ~4\d\.\d\d GiB GPU > 5\.00"):
        auto_plan(cfg, 5.0, 1)


def test_a_chosen_plan_also_gets_the_tile_its_budget_needs():
    model = anatomy(run_config("manifest=x", f"model={FULL[0]}").model)
    cfg = run_config("manifest=x", f"model={FULL[0]}")
    workload = workload_of(cfg, (), model)
    assert planner.fit_tile("group_offload", model, workload, cfg.memory, 24.0) == 128
    assert planner.fit_tile("none", model, workload, cfg.memory, 79.0) is None
    assert planner.fit_tile("group_offload", model, workload, cfg.memory, None) is None  # no budget: the VAE's own
    fixed = replace(cfg.memory, vae_tile=192)
    assert planner.fit_tile("group_offload", model, workload, fixed, 24.0) == 192  # the user's tile stands


def test_a_smaller_tile_decodes_the_tiny_video_in_pieces():
    vae = build_pipeline(run_config("manifest=x", f"model={TINY}").model, torch.device("cpu")).vae
    vae.enable_tiling()
    latents = torch.randn(1, vae.config.latent_channels, 3, 6, 6)  # 96 x 96 pixels
    calls = []
    tiled = vae.tiled_decode
    vae.tiled_decode = lambda z, **kw: calls.append(z.shape) or tiled(z, **kw)
    whole = vae.decode(latents).sample
    assert not calls  # 96 pixels fit the VAE's own tile
    placement.set_vae_tile(vae, 64)
    assert (vae.tile_sample_min_height, vae.tile_latent_min_height) == (64, 4)
    pieces = vae.decode(latents).sample
    assert calls and pieces.shape == whole.shape == (1, 3, 9, 96, 96)


def test_a_placement_of_the_vaes_own_tile_after_a_smaller_one_puts_the_own_back():
    """enable_tiling() keeps the last tile set: rows of a shape planned with the VAE's own tile (vae_tile
    None, as recorded) followed rows of 128-pixel tiles and decoded in those."""
    from batch_runner.replica.planner import Placement

    vae = build_pipeline(run_config("manifest=x", f"model={TINY}").model, torch.device("cpu")).vae
    own = (vae.tile_sample_min_height, vae.tile_latent_min_height)
    tiles = {side: Placement("none", "", vae_tiling=True, vae_tile=side) for side in (64, None)}
    placement.set_vae_decode(vae, tiles[None])  # never changed: left as diffusers keeps it
    assert (vae.tile_sample_min_height, vae.tile_latent_min_height) == own
    placement.set_vae_decode(vae, tiles[64])
    assert (vae.tile_sample_min_height, vae.tile_latent_min_height) == (64, 4)
    placement.set_vae_decode(vae, tiles[None])
    assert (vae.tile_sample_min_height, vae.tile_latent_min_height) == own


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model=tiny-cogvideox", "memory.vae_tile=128"],
            "memory.vae_tile=128 is not a setting of tiny-cogvideox",
        ),
        ([f"model={TINY}", "memory.vae_tile=96"], "memory.vae_tile=96 is not a multiple of 64 pixels"),
        ([f"model={TINY}", "memory.vae_tile=0"], "memory.vae_tile"),
    ],
)
def test_a_vae_tile_the_model_cannot_use_is_refused(overrides, message):
    with pytest.raises(UserError) as refused:
        check_settings(run_config("manifest=x", *overrides))
    assert message in str(refused.value)


# --- attention without the text's padding ------------------------------------------------------------


def _transformer_inputs(real: list[tuple[int, int]], image: bool = True, seed: int = 0) -> dict:
    """Random inputs of the tiny transformer for a batch: per sample, how many of the 64 language-model
    tokens and of the 16 glyph tokens are real (the rest padding), as the pipeline leaves them."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(real)

    def mask(counts: list[int], length: int) -> torch.Tensor:
        return (torch.arange(length)[None] < torch.tensor(counts)[:, None]).long()

    return {
        "hidden_states": torch.randn(batch, 9, 3, 4, 6, generator=generator),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 64, 16, generator=generator),
        "encoder_attention_mask": mask([r[0] for r in real], 64),
        "encoder_hidden_states_2": torch.randn(batch, 16, 16, generator=generator),
        "encoder_attention_mask_2": mask([r[1] for r in real], 16),
        "image_embeds": torch.randn(batch, 16, 12, generator=generator) * image,
        "return_dict": False,
    }


@pytest.fixture
def attention_calls(monkeypatch) -> list[dict]:
    """The mask and backend of each attention call the dual-stream blocks make."""
    from batch_runner.families.hunyuan15 import attention

    calls = []

    def recorded(*args, **kwargs):
        calls.append({"masked": kwargs["attn_mask"] is not None, "backend": kwargs["backend"]})
        return dispatch(*args, **kwargs)

    dispatch = attention.dispatch_attention_fn
    monkeypatch.setattr(attention, "dispatch_attention_fn", recorded)
    return calls


@pytest.mark.parametrize(
    ("real", "image", "masked"),
    [
        ([(5, 0)], True, False),  # no quoted text: no glyph token at all
        ([(64, 16)], True, False),  # nothing padded
        ([(9, 3), (9, 3)], True, False),  # a batch of texts of one length
        ([(9, 3), (20, 3)], True, True),  # lengths differ within the batch: diffusers' mask
        ([(9, 3)], False, True),  # no image (zeros, text-to-video): its tokens are padding too
    ],
)
def test_dropping_the_text_padding_leaves_the_transformers_output_as_it_is(real, image, masked, attention_calls):
    model = run_config("manifest=x", f"model={TINY}").model
    stock, ours = build_pipeline(model).transformer, build_pipeline(model).transformer
    family_named("hunyuan15").streamline(ours, model)
    inputs = _transformer_inputs(real, image)
    with torch.no_grad():
        expected = stock(**inputs)[0]
        attention_calls.clear()
        made = ours(**inputs)[0]
    torch.testing.assert_close(made, expected, rtol=1e-5, atol=1e-5)
    assert len(attention_calls) == len(ours.transformer_blocks)
    assert {c["masked"] for c in attention_calls} == {masked}


def test_the_chosen_kernel_runs_the_unmasked_attention_and_sdpa_chooses_for_a_masked_one(attention_calls):
    """A dispatcher backend is strict (flash refuses a mask): it runs only the calls without one."""
    from torch.nn.attention import SDPBackend

    model = run_config("manifest=x", f"model={TINY}").model
    pipe = build_pipeline(model)
    family = family_named("hunyuan15")
    family.streamline(pipe.transformer, model)
    family.prefer_attention(pipe.transformer, [SDPBackend.FLASH_ATTENTION], "_native_flash")
    with torch.no_grad():
        pipe.transformer(**_transformer_inputs([(5, 2)]))
        pipe.transformer(**_transformer_inputs([(5, 2), (7, 2)]))
    blocks = len(pipe.transformer.transformer_blocks)
    assert [c["backend"] for c in attention_calls] == ["_native_flash"] * blocks + [None] * blocks


@pytest.mark.slow
def test_compiled_blocks_make_one_graph_for_every_text_length():
    """Prompts differ in length, so the cut text does: its length is dynamic in the compiled blocks
    (a graph per length would recompile for nearly every row)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = run_config("manifest=x", f"model={TINY}").model
    transformer = build_pipeline(model).transformer
    family = family_named("hunyuan15")
    family.streamline(transformer, model)
    torch._dynamo.reset()
    counters.clear()
    speed.compile_blocks(family.blocks(transformer), family.text_length_inputs)
    with torch.no_grad():
        for language, glyph in ((5, 0), (9, 3), (30, 7), (64, 16)):
            made = transformer(**_transformer_inputs([(language, glyph)]))[0]
            assert torch.isfinite(made).all()
    assert counters["stats"]["unique_graphs"] == 1, counters["stats"]


def test_choosing_a_models_attention_kernel_leaves_other_models_default_alone():
    """diffusers' set_attention_backend also changes the process-wide default: a kernel chosen for
    one transformer (here cuDNN, which a CPU cannot run) must not reach another pipeline's attention."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from torch.nn.attention import SDPBackend

    before = _AttentionBackendRegistry.get_active_backend()[0]
    pipe = build_pipeline(run_config("manifest=x", f"model={TINY}").model)
    family_named("hunyuan15").prefer_attention(pipe.transformer, [SDPBackend.CUDNN_ATTENTION], "_native_cudnn")
    processors = pipe.transformer.attn_processors.values()
    assert {p._attention_backend for p in processors if hasattr(p, "_attention_backend")} == {"_native_cudnn"}
    assert _AttentionBackendRegistry.get_active_backend()[0] == before
