"""What only Cosmos-Predict2.5 does: its image goes in as a one-frame clip (diffusers' image path needs
torchvision), and its guardrail is a setting. The shared checks of every family are in
test_family_contract.py."""

from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import pytest
import torch

from batch_runner.errors import UserError
from batch_runner.families import family_named
from batch_runner.families.cosmos import PassThroughGuardrail
from batch_runner.replica.pipeline import build_pipeline

from .conftest import run_config, tiny_job

TINY = "tiny-cosmos"


def _embeds(pipe, model, texts):
    family = family_named("cosmos")
    return dict(zip(texts, family.encode_prompts(pipe, texts, model, torch.float32), strict=True))


def test_the_image_as_a_one_frame_clip_makes_the_video_of_diffusers_image_path(tmp_path, monkeypatch):
    """diffusers' image path, with torchvision's to_tensor as it is for an 8-bit RGB image (values
    over 255, channels first), makes the very video the family's one-frame-clip path makes."""
    from diffusers.pipelines.cosmos import pipeline_cosmos2_5_predict as upstream_pipeline

    cfg = run_config("manifest=x", f"model={TINY}")
    pipe = build_pipeline(cfg.model)
    job, images = tiny_job(tmp_path, steps=2)
    embeds = _embeds(pipe, cfg.model, [job.prompt, job.negative_prompt])
    arguments = family_named("cosmos").call_arguments(cfg.model, job, images, embeds)
    with torch.no_grad():
        ours = pipe(**arguments, generator=torch.Generator().manual_seed(1), output_type="pt").frames[0]

        def to_tensor(image):
            return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255

        functional = types.SimpleNamespace(to_tensor=to_tensor)
        torchvision = types.SimpleNamespace(transforms=types.SimpleNamespace(functional=functional))
        monkeypatch.setattr(upstream_pipeline, "torchvision", torchvision, raising=False)
        reference_arguments = {k: v for k, v in arguments.items() if k != "guarded_prompt"}
        theirs = upstream_pipeline.Cosmos2_5_PredictBasePipeline.__call__(
            pipe, **reference_arguments, generator=torch.Generator().manual_seed(1), output_type="pt"
        ).frames[0]
    assert ours.shape == (job.num_frames, 3, job.height, job.width)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_without_the_guardrail_a_pass_through_stands_in_and_every_prompt_passes():
    cfg = run_config("manifest=x", f"model={TINY}", "model.options.guardrail=false")
    pipe = build_pipeline(cfg.model)
    assert isinstance(pipe.safety_checker, PassThroughGuardrail)
    frames = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    assert pipe.safety_checker.check_text_safety("anything")
    assert pipe.safety_checker.check_video_safety(frames) is frames


def test_the_guardrail_without_its_package_is_refused_naming_the_install_and_the_way_to_turn_it_off(monkeypatch):
    monkeypatch.setitem(sys.modules, "cosmos_guardrail", None)  # an import of it raises ImportError
    cfg = run_config("manifest=x", f"model={TINY}", "model.options.guardrail=true")
    with pytest.raises(UserError, match="pip install cosmos_guardrail") as refused:
        build_pipeline(cfg.model)
    assert "model.options.guardrail=false" in str(refused.value)


def test_a_prompt_the_guardrail_flags_fails_its_row_before_anything_is_denoised(tmp_path):
    """The runner passes embeddings, which diffusers' own prompt check never sees: the row's prompt
    goes to the guardrail as `guarded_prompt`."""
    cfg = run_config("manifest=x", f"model={TINY}")
    pipe = build_pipeline(cfg.model)
    seen = []

    class Flagging(PassThroughGuardrail):
        def check_text_safety(self, prompt: str) -> bool:
            seen.append(prompt)
            return False

    pipe.safety_checker = Flagging()
    steps = []
    job, images = tiny_job(tmp_path, steps=2)
    embeds = _embeds(pipe, cfg.model, [job.prompt, job.negative_prompt])
    arguments = family_named("cosmos").call_arguments(cfg.model, job, images, embeds)
    with pytest.raises(ValueError, match="Cosmos Guardrail flagged the prompt as unsafe"):
        pipe(**arguments, callback_on_step_end=lambda *a: steps.append(a) or {}, output_type="pt")
    assert seen == [job.prompt] and steps == []


def test_the_full_size_configs_keep_the_guardrail_on_and_the_tiny_one_off():
    family = family_named("cosmos")
    for name in ("cosmos-predict2.5-2b", "cosmos-predict2.5-14b"):
        assert family.options(run_config("manifest=x", f"model={name}").model).guardrail is True
    assert family.options(run_config("manifest=x", f"model={TINY}").model).guardrail is False


def test_the_chosen_sdpa_kernel_order_runs_inside_every_attention_and_leaves_the_video_as_it_is(tmp_path):
    """Its processors take no backend of their own: the family wraps each in `sdpa_kernel` with the
    order chosen (math only here, which every CPU build has). An order of cuDNN alone, which no CPU
    runs, fails the call: the order is in force inside it."""
    from torch.nn.attention import SDPBackend

    from batch_runner.families.cogvideox import PreferredAttention

    cfg = run_config("manifest=x", f"model={TINY}")
    job, images = tiny_job(tmp_path, steps=2)
    made = []
    for order in (None, [SDPBackend.MATH], [SDPBackend.CUDNN_ATTENTION]):
        pipe = build_pipeline(cfg.model)
        if order:
            family_named("cosmos").prefer_attention(pipe.transformer, order, "_native_math")
            wrapped = [m.processor for m in pipe.transformer.modules() if hasattr(m, "set_processor")]
            assert wrapped and all(isinstance(p, PreferredAttention) for p in wrapped)
        arguments = family_named("cosmos").call_arguments(
            cfg.model, job, images, _embeds(pipe, cfg.model, [job.prompt, job.negative_prompt])
        )
        with torch.no_grad(), contextlib.ExitStack() as fails:
            if order == [SDPBackend.CUDNN_ATTENTION]:
                fails.enter_context(pytest.raises(RuntimeError, match=r"No viable backend|No available kernel"))
            made.append(pipe(**arguments, generator=torch.Generator().manual_seed(1), output_type="pt").frames[0])
    torch.testing.assert_close(made[1], made[0], rtol=1e-5, atol=1e-5)


def _transformer_call(tmp_path) -> tuple[torch.nn.Module, dict]:
    """The tiny transformer and the keyword arguments of its first call in a row's video: a latent
    clip whose first frame (the image) has its own timestep."""
    cfg = run_config("manifest=x", f"model={TINY}")
    pipe = build_pipeline(cfg.model)
    job, images = tiny_job(tmp_path, steps=1)
    arguments = family_named("cosmos").call_arguments(
        cfg.model, job, images, _embeds(pipe, cfg.model, [job.prompt, job.negative_prompt])
    )
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw) or None, with_kwargs=True)
    with torch.no_grad():
        pipe(**arguments, generator=torch.Generator().manual_seed(1), output_type="latent")
    hook.remove()
    return pipe.transformer, calls[0]


@pytest.mark.parametrize("timestep", ["per frame", "per row"])
def test_per_frame_modulation_gives_the_stock_transformers_output(tmp_path, timestep):
    """streamline's transformer (frames.py) against diffusers' own, on the call a row makes: a batch
    of two whose frames have different timesteps, and a single timestep per row."""
    import copy

    from batch_runner.families.cosmos.frames import FrameModulatedBlock, FrameModulatedCosmos

    stock, kwargs = _transformer_call(tmp_path)
    assert kwargs["timestep"].ndim == 5 and kwargs["timestep"].flatten().unique().numel() == 2
    generator = torch.Generator().manual_seed(2)
    second = {  # another row in the batch: other latents, text and noise levels
        "hidden_states": torch.randn(kwargs["hidden_states"].shape, generator=generator),
        "encoder_hidden_states": kwargs["encoder_hidden_states"] * 0.5,
        "condition_mask": kwargs["condition_mask"],
        "timestep": kwargs["timestep"] * 0.6,
    }
    kwargs |= {k: torch.cat([kwargs[k], v]) for k, v in second.items()}
    if timestep == "per row":
        kwargs["timestep"] = torch.tensor([0.3, 0.7])
    ours = copy.deepcopy(stock)
    family_named("cosmos").streamline(ours, run_config("manifest=x", f"model={TINY}").model)
    assert type(ours) is FrameModulatedCosmos
    assert all(type(b) is FrameModulatedBlock for b in ours.transformer_blocks)
    with torch.no_grad():
        expected, made = (t(**kwargs)[0] for t in (stock, ours))
    assert made.shape == expected.shape == kwargs["hidden_states"].shape
    torch.testing.assert_close(made, expected, rtol=1e-5, atol=1e-6)
