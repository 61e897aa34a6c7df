"""LTX-2 image-to-video with sound (Lightricks, 19B), through diffusers' `LTX2ImageToVideoPipeline`.

One transformer denoises the video latents and the audio latents together (each attends to the
other every block), so every row makes a video and its sound track; the pipeline decodes the video
with the video VAE and the sound with the audio VAE and a vocoder (stereo, 24 kHz for LTX-2). The
sound goes into the row's MP4 as an AAC track (batch_runner.outputs.video); `output.audio=false`
skips the audio VAE and the vocoder (the audio latents are still denoised: they shape the video).

The text encoder is Gemma 3 12B; the pipeline stacks all of its hidden states per token and feeds
them through `connectors` (a projection and two small transformers, one per modality) on every call,
so the connectors run with the row, not with the chunk's text encoding: they are an encoder here
(streamed layer by layer where the plan streams encoders).

The VAE compresses 32x32 pixels and 8 frames into one latent (frames 8N+1, sides multiples of 32)
and the transformer takes each latent as one token. Guidance, as diffusers' defaults for LTX-2:
classifier-free guidance for video and audio (their conditional and unconditional passes in one
batch of 2), then spatio-temporal guidance (a pass meant to skip block 28's self-attention, which
LTX-2.0's blocks do not: diffusers computes the conditional pass again) and modality-isolation
guidance (a pass without the audio-video cross-attention), each a forward of batch 1. The runner's
transformer makes all of them in one forward of 3 (guidance.py; diffusers' recipes in the benchmarks
keep three). The distilled checkpoint runs none of them (guidance 1, 8 steps on its own sigmas).

diffusers documents LTX-2 with a second pass through a latent upsampler; this family makes the
single pass at the row's size, as it does for LTX-Video.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from batch_runner.config import ModelConfig
from batch_runner.families.base import (
    DECODER,
    DENOISER,
    ENCODER,
    ActivationTerms,
    Family,
    Geometry,
    arch_json,
    imported,
    seeded,
)
from batch_runner.families.tokenizer import TINY_TEXT_DIM, tiny_tokenizer
from batch_runner.upstream import DIFFUSERS_VERSIONS, Mirror

if TYPE_CHECKING:
    from diffusers import LTX2ImageToVideoPipeline


@dataclass(frozen=True)
class LTX2Options:
    """The guidance besides the row's own `guidance_scale` (which is the video's classifier-free
    guidance).

    audio_guidance_scale: the sound's classifier-free guidance (diffusers' default 7; 1 turns it
    off); a row without guidance (guidance_scale <= 1) has none for the sound either, as no negative
    prompt is encoded for it. stg_scale: spatio-temporal guidance of video and sound (0 turns it
    off; on LTX-2.0 its term is 0 either way and costs nothing here, guidance.py). modality_scale:
    modality-isolation guidance (1 turns it off: one sample fewer in a step's forward).
    distilled_sigmas: the distilled checkpoint's own 8 sigmas (diffusers' DISTILLED_SIGMA_VALUES)
    where a row makes 8 steps; any other step count takes the scheduler's.
    """

    audio_guidance_scale: float = 7.0
    stg_scale: float = 1.0
    modality_scale: float = 3.0
    distilled_sigmas: bool = False

    @property
    def runs_stg(self) -> bool:
        """Whether a step makes diffusers' STG pass (its scale is above 0)."""
        return self.stg_scale > 0

    @property
    def isolates_modalities(self) -> bool:
        """Whether a step makes diffusers' modality-isolation pass (its scale is above 1)."""
        return self.modality_scale > 1


# Texts a Gemma pass encodes (see LTX2.encode_prompts): their stacked states peak at 1.5 GiB.
TEXTS_PER_PASS = 2


@dataclass(frozen=True)
class HostPrompt:
    """A text's encoding as the replica caches it: only its real tokens' stacked hidden states, in host
    memory, and where they sit among the padded positions.

    Gemma's 49 stacked hidden states of 3840 make 188160 numbers a token: padded to 1024 tokens, one
    text is 385 MB in bf16, and the replica caches dozens. The connectors zero every padded position
    before reading it (`per_layer_masked_mean_norm`), so zeros there give the same video; a text of
    200 tokens keeps a fifth of that, off the GPU, and goes back to it padded for its row.
    """

    tokens: torch.Tensor  # (real tokens, width x layers), on the host
    mask: torch.Tensor  # (padded length,): 1 where a real token sits, on the host
    device: torch.device

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding (1, length, width x layers), attention mask (1, length)) on the pipeline's device."""
        where = self.mask.bool()
        embedding = self.tokens.new_zeros(len(self.mask), self.tokens.shape[1])
        embedding[where] = self.tokens
        return embedding.unsqueeze(0).to(self.device), self.mask.unsqueeze(0).to(self.device)


class LTX2(Family):
    name = "ltx2"
    # Not split across GPUs: diffusers' LTX-2 `_cp_plan` splits the video tokens only, not the audio
    # tokens that every block attends to as well (not tried yet).
    context_parallel = False
    pipeline_class = imported("diffusers:LTX2ImageToVideoPipeline")
    roles: ClassVar[dict[str, str]] = {
        "text_encoder": ENCODER,
        "connectors": ENCODER,
        "transformer": DENOISER,
        "vae": DECODER,
        "audio_vae": DECODER,
        "vocoder": DECODER,
    }
    mirrors = (
        Mirror(
            "diffusers",
            "diffusers.pipelines.ltx2.pipeline_ltx2_image2video:LTX2ImageToVideoPipeline.__call__",
            DIFFUSERS_VERSIONS,
            "guidance.py serves a step's STG and modality-isolation calls (their arguments) from its first",
        ),
        Mirror(
            "diffusers",
            "diffusers.models.transformers.transformer_ltx2:LTX2VideoTransformerBlock.forward",
            DIFFUSERS_VERSIONS,
            "guidance.py: STG perturbs only blocks with perturbed_attn; cross-modal outputs are added gated",
        ),
        Mirror(
            "diffusers",
            "diffusers.models.autoencoders.autoencoder_kl_ltx2:AutoencoderKLLTX2Video.tiled_decode",
            DIFFUSERS_VERSIONS,
            "_decode_tiles_without_slivers: a tile every tile_sample_stride_* pixels of each side",
        ),
    )
    # Denoising: LTX-Video's terms (same token geometry, a transformer of width 4096 like its 13B); a
    # guided step is one forward of the guidance pair, and one sample more where the options isolate
    # the modalities (`forward_batch`, guidance.py). Measured on an H200 (docs/benchmarks.json,
    # 2026-12-04): `none` reserved 73.8 GiB; group_offload allocated 10.64 GiB under 24 and 16 GiB
    # caps (code 7efd1f5 and 37cdf72), and with the guidance pair as a batch of 2 (47eb3ee) ran out of
    # memory under a 12 GiB cap with 10.13 allocated asking for 270 MiB more (a 120 x 512 x 768 RGB
    # tensor in bf16: the end of the whole-frame decode) over 3.1 GiB of resident VAEs and transformer
    # top level; sequential_cpu_offload, which streams the VAE too, allocated 6.77 GiB at its peak
    # under a 12 GiB cap. So the decode needs 6.5 to 6.8 GiB at 768x512 and group_offload about 0.5
    # GiB besides its resident weights: charged 7.3 (9970 bytes a pixel per 512 channels of the widest
    # block, 1024), which keeps whole frames under group_offload above 12 GiB.
    # Its VAE is LTX-Video's design, and diffusers' `enable_tiling` tiles it in space only (512-pixel
    # tiles, 448 apart), each tile decoding every frame at once, so the decode grows with the row's
    # frames (charged for them, measured at 121). But its tiles do not lower the peak as LTX-Video's
    # do: on the H200 (2026-12-05, code 978c9b7) group_offload with 512-pixel tiles ran out of memory
    # under a 12 GiB cap (the replica stepped down), and sequential_cpu_offload allocated 6.71 GiB
    # with tiles against 6.77 with whole frames. So a tiled decode is charged as whole frames up to
    # two tiles' pixels (768x512 is 1.5). Below text_offload's ~51 GiB the planner plans
    # group_offload (~12.2 GiB), and under 12 GiB full_offload, which streams the VAEs as
    # sequential_cpu_offload does and the transformer by blocks as group_offload does
    # (sequential_cpu_offload, the 12 GiB plan before, took 6.91 s a step on an H100, 2026-12-05,
    # against group_offload's 1.12 at 24 GiB); full_offload took 1.10 s a step under 12 GiB, 8.13
    # GiB allocated (H100, 2026-12-05, docs/experiments/2026-12-05i).
    activations = ActivationTerms(
        resident=24.0,
        streamed=24.0,
        decode_per_pixel=9970.0,
        tiled_pixels=512 * 512 * 2,
        guidance_batch=2,
        decode_frames=121,
    )
    schedulers: ClassVar[dict[str, str]] = {"euler": "FlowMatchEulerDiscreteScheduler"}
    # At 1 step the pipeline's scheduler cannot find its own timestep (IndexError, diffusers 0.42.1).
    min_steps = 2
    Options = LTX2Options
    makes_audio = True

    def output_options(self, model: ModelConfig) -> dict[str, Any]:
        return vars(self.options(model)).copy()

    # --- building ---

    def finish(self, model: ModelConfig, pipe: Any) -> Any:
        _decode_tiles_without_slivers(pipe.vae)
        return pipe

    def tiny(self, model: ModelConfig) -> LTX2ImageToVideoPipeline:
        """LTX-2 at toy scale, every component of the real one (Gemma 3 with its vision tower, the
        connectors, the audio VAE and vocoder) with random weights. The VAE compresses 8x8 pixels and
        8 frames, so the tiny model keeps the real one's 8N+1 frame rule; the vocoder turns 100 mel
        frames a second into 8 kHz stereo (an AAC sample rate), so its track is as long as the video."""
        from diffusers import (
            AutoencoderKLLTX2Audio,
            AutoencoderKLLTX2Video,
            FlowMatchEulerDiscreteScheduler,
            LTX2VideoTransformer3DModel,
        )
        from diffusers.pipelines.ltx2 import LTX2TextConnectors
        from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        tokenizer = tiny_tokenizer()
        with seeded(0):
            text_config = {
                "vocab_size": tokenizer.vocab_size,
                "hidden_size": TINY_TEXT_DIM,
                "num_hidden_layers": 2,
                "intermediate_size": 64,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "sliding_window": 16,
            }
            vision_config = {
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "intermediate_size": 32,
                "num_attention_heads": 2,
                "image_size": 28,
                "patch_size": 14,
            }
            config = Gemma3Config(text_config=text_config, vision_config=vision_config, mm_tokens_per_image=4)
            text_encoder = Gemma3ForConditionalGeneration(config).eval()
            connectors = LTX2TextConnectors(
                caption_channels=TINY_TEXT_DIM,
                text_proj_in_factor=text_config["num_hidden_layers"] + 1,
                video_connector_num_attention_heads=4,
                video_connector_attention_head_dim=8,
                video_connector_num_layers=1,
                video_connector_num_learnable_registers=None,
                audio_connector_num_attention_heads=4,
                audio_connector_attention_head_dim=8,
                audio_connector_num_layers=1,
                audio_connector_num_learnable_registers=None,
                connector_rope_base_seq_len=32,
                rope_double_precision=False,
                rope_type="split",
            )
            transformer = LTX2VideoTransformer3DModel(
                in_channels=8,
                out_channels=8,
                patch_size=1,
                patch_size_t=1,
                num_attention_heads=2,
                attention_head_dim=8,
                cross_attention_dim=16,
                audio_in_channels=8,
                audio_out_channels=8,
                audio_num_attention_heads=2,
                audio_attention_head_dim=8,  # cuDNN's attention takes head sizes of 8 and up
                audio_cross_attention_dim=16,
                num_layers=2,
                caption_channels=TINY_TEXT_DIM,
                rope_type="split",
                rope_double_precision=False,
            )
            vae = AutoencoderKLLTX2Video(
                latent_channels=8,
                block_out_channels=(8, 8, 8),
                decoder_block_out_channels=(8, 8, 8),
                layers_per_block=(1, 1, 1, 1),
                decoder_layers_per_block=(1, 1, 1, 1),
                down_block_types=("LTX2VideoDownBlock3D",) * 3,
                spatio_temporal_scaling=(True, True, True),
                decoder_spatio_temporal_scaling=(True, True, True),
                decoder_inject_noise=(False, False, False, False),
                downsample_type=("spatiotemporal",) * 3,
                upsample_type=("spatiotemporal",) * 3,
                upsample_residual=(False, False, False),
                upsample_factor=(1, 1, 1),
                patch_size=1,
                patch_size_t=1,
                timestep_conditioning=False,
            )
            # The audio latents' channels x mel bins (4 x 8/4) are the transformer's audio channels
            # and the size of the audio VAE's latent statistics (`base_channels`).
            audio_vae = AutoencoderKLLTX2Audio(
                base_channels=8,
                output_channels=2,
                ch_mult=(1,),
                num_res_blocks=1,
                attn_resolutions=None,
                in_channels=2,
                resolution=32,
                latent_channels=4,
                norm_type="pixel",
                causality_axis="height",
                dropout=0.0,
                mid_block_add_attention=False,
                sample_rate=16000,
                mel_hop_length=160,
                is_causal=True,
                mel_bins=8,
            )
            vocoder = LTX2Vocoder(
                in_channels=2 * 8,
                hidden_channels=32,
                out_channels=2,
                upsample_kernel_sizes=[16, 20],
                upsample_factors=[8, 10],
                resnet_kernel_sizes=[3],
                resnet_dilations=[[1, 3]],
                leaky_relu_negative_slope=0.1,
                output_sampling_rate=8000,
            )
        return self.pipeline_class(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(arch_json("ltx-2", "scheduler")),
            vae=vae,
            audio_vae=audio_vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            connectors=connectors,
            transformer=transformer,
            vocoder=vocoder,
        )

    def assemble(self, model: ModelConfig, modules: dict[str, Any], arch: str) -> LTX2ImageToVideoPipeline:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return self.pipeline_class(
            tokenizer=tiny_tokenizer(model.max_sequence_length),
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(arch_json(arch, "scheduler")),
            **modules,
        )

    # --- rows ---

    def encode_prompts(self, pipe: Any, texts: list[str], model: ModelConfig, dtype: torch.dtype) -> list[HostPrompt]:
        """Gemma's stacked hidden states of each text's real tokens, with its attention mask (the
        connectors read both on every call), kept in host memory (`HostPrompt`).

        Gemma's memory grows with the texts of a pass, and diffusers' own call keeps more than it
        reads: under a 16 GiB cap a chunk of 9 texts in one pass asked for 4.5 GiB with 11.7
        allocated (H200, 2026-12-04), which is its language-model head's logits (262,208 words x
        1024 tokens x 9 texts in bf16); diffusers reads only the hidden states, and holds a text's
        49 of them twice while it stacks them (770 MB a text). So the head makes the last
        position's logits only (`_last_logit_only`), and a pass takes at most `TEXTS_PER_PASS`."""
        device = pipe._execution_device
        cached = []
        with _last_logit_only(pipe.text_encoder):
            for start in range(0, len(texts), TEXTS_PER_PASS):
                embedded, masks, _, _ = pipe.encode_prompt(
                    prompt=texts[start : start + TEXTS_PER_PASS],
                    do_classifier_free_guidance=False,
                    max_sequence_length=model.max_sequence_length,
                    device=device,
                    dtype=dtype,
                )
                cached += [HostPrompt(e[m.bool()].cpu(), m.cpu(), device) for e, m in zip(embedded, masks, strict=True)]
                del embedded, masks
        return cached

    def call_arguments(self, model: ModelConfig, job: Any, images: dict[str, Any], embeds: Any) -> dict[str, Any]:
        """The row's image as the first frame, its frame rate as the video's (the rotary positions in
        time and the sound's length both follow it), and the family's guidance."""
        from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES

        options = self.options(model)
        guided = job.guided
        prompt, prompt_mask = _padded(embeds[job.prompt])
        negative, negative_mask = _padded(embeds[job.negative_prompt] if guided else None)
        arguments = {
            "image": images["image"],
            "prompt_embeds": prompt,
            "prompt_attention_mask": prompt_mask,
            "negative_prompt_embeds": negative,
            "negative_prompt_attention_mask": negative_mask,
            "height": job.height,
            "width": job.width,
            "num_frames": job.num_frames,
            "frame_rate": job.fps,
            "num_inference_steps": job.num_inference_steps,
            "guidance_scale": job.guidance_scale,
            # Unguided, the sound is too (diffusers reads a falsy value as "the video's").
            "audio_guidance_scale": options.audio_guidance_scale if guided else 1.0,
            "stg_scale": options.stg_scale,
            "audio_stg_scale": options.stg_scale,
            "modality_scale": options.modality_scale,
            "audio_modality_scale": options.modality_scale,
            "max_sequence_length": model.max_sequence_length,
        }
        if options.distilled_sigmas and job.num_inference_steps == len(DISTILLED_SIGMA_VALUES):
            arguments["sigmas"] = list(DISTILLED_SIGMA_VALUES)
        return arguments

    # --- sound ---

    def audio_skipped(self, pipe: Any) -> contextlib.AbstractContextManager:
        """The pipeline without its audio decode: the audio VAE's decode hands the latents through and
        the vocoder returns None, so the call's `audio` is None and neither runs."""
        return _shadowed(
            (pipe.audio_vae, "decode", lambda latents, *args, **kwargs: (latents,)),
            (pipe.vocoder, "forward", lambda *args, **kwargs: None),
        )

    def audio_track(self, pipe: Any, output: Any) -> tuple[torch.Tensor, int] | None:
        """The row's waveform (channels, samples) in [-1, 1] and its sample rate (the vocoder's)."""
        if output.audio is None:
            return None
        return output.audio[0], int(pipe.vocoder.config.output_sampling_rate)

    # --- structure ---

    def forward_batch(self, model: ModelConfig, guided: bool) -> int:
        """The guidance pair (or the conditional sample alone), and the modality-isolated sample
        that guidance.py batches with it whenever the options isolate, guided or not."""
        return super().forward_batch(model, guided) + self.options(model).isolates_modalities

    def streamline(self, transformer: torch.nn.Module, model: ModelConfig) -> None:
        """A step's guidance passes in one forward (guidance.py), where the options run them.

        Its attention modules are not fused (speed.fuse_qkv then passes over them): LTX-2's processor
        always reads to_q, to_k and to_v, and its audio-video cross-attentions project queries and
        keys of different widths, which diffusers' fusing concatenates and fails on."""
        from batch_runner.families.ltx2.guidance import batch_guidance

        for module in transformer.modules():
            if hasattr(module, "_supports_qkv_fusion"):
                module._supports_qkv_fusion = False
        options = self.options(model)
        batch_guidance(transformer, stg=options.runs_stg, isolation=options.isolates_modalities)

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return transformer.transformer_blocks

    def geometry(self, configs: dict[str, dict]) -> Geometry:
        t, vae = configs["transformer"], configs["vae"]
        kinds = vae.get("downsample_type") or ()
        spatial = vae["patch_size"] * 2 ** sum(k in ("spatial", "spatiotemporal") for k in kinds)
        temporal = vae["patch_size_t"] * 2 ** sum(k in ("temporal", "spatiotemporal") for k in kinds)
        return Geometry(
            spatial=vae.get("spatial_compression_ratio") or spatial,
            temporal=vae.get("temporal_compression_ratio") or temporal,
            patch=t["patch_size"],
            patch_t=t["patch_size_t"],
            hidden=t["num_attention_heads"] * t["attention_head_dim"],
            text_in_sequence=False,
            vae_channels=max(vae["decoder_block_out_channels"]),
        )


def _padded(text: HostPrompt | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A cached text as the pipeline takes it; None (diffusers' own recipe encodes the prompt itself) stays None."""
    return text.padded() if text is not None else (None, None)


def _last_logit_only(text_encoder: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Gemma called with `logits_to_keep=1`: its hidden states as they are, its head's logits for the
    last position only."""
    return _shadowed((text_encoder, "forward", functools.partial(text_encoder.forward, logits_to_keep=1)))


def _decode_tiles_without_slivers(vae: Any) -> None:
    """`vae.tiled_decode`, each side's tile stride shortened for the call where diffusers' would end
    that side in a tile one latent wide.

    diffusers 0.42.1 starts a tile of 16 latents every 14 along each side (512 and 448 pixels), so a
    side of 14k + 1 latents (480, 928 or 1376 pixels) ends in a tile one latent wide, and LTX-2's
    decoder pads by reflection, which needs two ("Padding size should be less than the corresponding
    input dimension"): an 832x480 row failed wherever its plan decoded in tiles, and a failure that is
    not out of memory is no reason to step down. Such a side takes the longest stride up to the VAE's
    own that leaves its last tile two latents or more; every other side decodes exactly as before.
    """
    decode = vae.tiled_decode
    ratio = vae.spatial_compression_ratio

    @functools.wraps(decode)
    def tiled_decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        strides = (
            (vae, name, ratio * _stride_without_sliver(latents, getattr(vae, name) // ratio))
            for name, latents in (("tile_sample_stride_height", z.shape[-2]), ("tile_sample_stride_width", z.shape[-1]))
        )
        with _shadowed(*strides):
            return decode(z, *args, **kwargs)

    vae.tiled_decode = tiled_decode


def _stride_without_sliver(latents: int, stride: int) -> int:
    """The longest stride up to `stride` whose tiles (started every `stride` from 0) do not end a
    side of `latents` in a tile one latent wide."""
    return next((shorter for shorter in range(stride, 1, -1) if latents % shorter != 1), stride)


@contextlib.contextmanager
def _shadowed(*replacements: tuple[Any, str, Any]) -> Iterator[None]:
    """Each (object, attribute, value) set on the instance for the call, then put back as it was:
    offloading hooks wrap `forward` there, so an instance attribute it had is restored, and one it
    had not is removed."""
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in replacements]
    for owner, name, value in replacements:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, previous in saved:
            if previous is None:
                owner.__dict__.pop(name, None)
            else:
                owner.__dict__[name] = previous


FAMILY = LTX2()
