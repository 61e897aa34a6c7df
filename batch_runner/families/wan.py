"""Wan 2.1 and 2.2 image-to-video (Wan-AI), as diffusers ships them in `WanImageToVideoPipeline`.

One pipeline class, three shapes of checkpoint:
* Wan 2.1 I2V 14B (480p, 720p): a CLIP image encoder conditions every block;
* Wan 2.2 TI2V 5B: a 48-channel VAE that compresses 16x16 pixels, `expand_timesteps` (the first
  latent frame is the image, timestep 0), no image encoder;
* Wan 2.2 I2V A14B: two experts, `transformer` for high noise and `transformer_2` for low noise,
  switched at `boundary_ratio` of the schedule; no image encoder.

Its attention goes through diffusers' attention dispatcher, so the kernel is chosen with
`set_attention_backend`. Text reaches the video tokens by cross-attention only, so text tokens do
not lengthen the self-attention sequence.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from batch_runner.config import LoraConfig, ModelConfig
from batch_runner.errors import UserError
from batch_runner.families.base import (
    DECODER,
    DENOISER,
    ENCODER,
    WAN_VAE_DECODE,
    ActivationTerms,
    Family,
    Geometry,
    arch_folder,
    arch_json,
    imported,
    seeded,
    wan_vae_geometry,
)
from batch_runner.families.tokenizer import TINY_TEXT_DIM, tiny_text_encoder, tiny_tokenizer
from batch_runner.upstream import DIFFUSERS_VERSIONS, Mirror

if TYPE_CHECKING:
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel

TINY_HEADS, TINY_HEAD_DIM = 2, 12


@dataclass(frozen=True)
class WanOptions:
    """model.options of Wan. The first two are the checkpoint's shape, as its model_index.json says
    (the tiny model is built to match); the third is a setting of the A14B's call.

    `boundary_ratio`: Wan 2.2 A14B's two experts, switched at this fraction of the schedule (null: one
    transformer); `expand_timesteps`: Wan 2.2 TI2V, the first latent frame is the image;
    `guidance_scale_2`: the guidance of the low-noise expert (null: guidance_scale).
    """

    boundary_ratio: float | None = None
    expand_timesteps: bool = False
    guidance_scale_2: float | None = None


class Wan(Family):
    name = "wan"
    Options = WanOptions
    pipeline_class = imported("diffusers:WanImageToVideoPipeline")
    roles: ClassVar[dict[str, str]] = {
        "text_encoder": ENCODER,
        "image_encoder": ENCODER,
        "transformer": DENOISER,
        "transformer_2": DENOISER,
        "vae": DECODER,
    }
    # Fitted to Wan2.1-I2V-14B at 81x480x832 on an H100 (docs/benchmarks.json): 2.4 GiB allocated
    # above the weights with the transformer resident (15.5 bytes per unit; 16 here). The
    # conditional and unconditional passes are separate forwards of batch 1. The decode: Wan's VAE
    # (base.WAN_VAE_DECODE).
    activations = ActivationTerms(resident=16.0, streamed=16.0, guidance_batch=1, **WAN_VAE_DECODE)
    mirrors = (
        Mirror(
            "diffusers",
            "diffusers.models.transformers.transformer_wan:WanAttnProcessor.__call__",
            DIFFUSERS_VERSIONS,
            "wan_attention.PairedRotaryAttention takes its place, its steps but the rotary's",
        ),
        *(
            Mirror(
                "diffusers",
                f"diffusers.models.transformers.transformer_wan:{helper}",
                DIFFUSERS_VERSIONS,
                "wan_attention.PairedRotaryAttention projects through it, for Wan and SkyReels-V2 alike",
            )
            for helper in ("_get_qkv_projections", "_get_added_kv_projections")
        ),
    )
    schedulers: ClassVar[dict[str, str]] = {
        "unipc": "UniPCMultistepScheduler",
        "euler": "FlowMatchEulerDiscreteScheduler",
    }

    def takes_last_image(self, model: ModelConfig) -> bool:
        """A14B conditions on frames through its latents alone and takes a last frame there. TI2V 5B
        (expand_timesteps) would silently drop it; Wan 2.1 I2V's CLIP conditioning takes one image
        (only the separate FLF2V checkpoint, with its position embedding, takes two)."""
        options = self.options(model)
        return options.boundary_ratio is not None and not options.expand_timesteps

    def output_options(self, model: ModelConfig) -> dict[str, Any]:
        """Every option changes the video; those left at their defaults are not named (the salt of the
        runs made before Wan 2.2 named none of them)."""
        return {key: value for key, value in asdict(self.options(model)).items() if value}

    # --- LoRAs ---

    def lora_target(self, model: ModelConfig, expert: str | None) -> tuple[str, dict[str, Any]]:
        """A14B's two experts take a LoRA each (Lightning: one for high noise, one for low); diffusers
        puts one into the second with `load_into_transformer_2`."""
        two_experts = self.options(model).boundary_ratio is not None
        if expert == "transformer_2" and two_experts:
            return "transformer_2", {"load_into_transformer_2": True}
        if expert not in (None, "transformer"):
            experts = "transformer, transformer_2" if two_experts else "transformer"
            raise UserError(f"model.loras: expert={expert!r} is not a denoiser of {model.name} (it has: {experts}).")
        return "transformer", {}

    def tiny_lora(self, model: ModelConfig, name: str) -> dict[str, torch.Tensor]:
        """A LoRA for the tiny transformer in a published Wan LoRA's keys (`diffusion_model.blocks.N...`):
        `lightx2v` as lightx2v's Wan 2.1 step-distill LoRAs (`lora_down`/`lora_up`/`alpha`, image
        cross-attention included where the model has it); `lightning-high` / `lightning-low` as
        Wan2.2-Lightning's per-expert LoRAs (`lora_A`/`lora_B`/`alpha`)."""
        formats = {"lightx2v": ("lora_down", "lora_up", 1), "lightning-high": ("lora_A", "lora_B", 2)}
        formats["lightning-low"] = ("lora_A", "lora_B", 3)
        if name not in formats:
            raise UserError(f"model.loras: tiny://{name} is not a tiny Wan LoRA (known: {', '.join(formats)}).")
        down, up, seed = formats[name]
        options = self.options(model)
        clip = not options.expand_timesteps and options.boundary_ratio is None
        with seeded(0):
            transformer = self._tiny_transformer(options.expand_timesteps, clip)
        return _lora_in_wan_keys(transformer, down, up, rank=4, seed=seed, scales=(0.5, 0.5))

    def published_lora(
        self, model: ModelConfig, entry: LoraConfig, denoiser: torch.nn.Module
    ) -> dict[str, torch.Tensor]:
        """Random values in the keys and rank of the published LoRA `entry` names: Wan2.2-Lightning's
        (`lora_A`/`lora_B`) where its path says Lightning, else lightx2v's (`lora_down`/`lora_up`);
        the rank its file name gives (`rank64`), else 64. Small values: the fused weights stay finite."""
        name = f"{entry.path}/{entry.weight_name or ''}"
        down, up = ("lora_A", "lora_B") if "lightning" in name.lower() else ("lora_down", "lora_up")
        rank = int(match.group(1)) if (match := re.search(r"rank(\d+)", name)) else 64
        seed = 3 if entry.expert == "transformer_2" else 2
        return _lora_in_wan_keys(denoiser, down, up, rank=rank, seed=seed, scales=(None, 0.01))

    # --- building ---

    def tiny(self, model: ModelConfig) -> WanImageToVideoPipeline:
        """Wan at toy scale, in the shape the config names: 2.1 with a CLIP image encoder, 2.2 TI2V
        (`expand_timesteps`, 48-channel VAE) or 2.2 A14B (two experts, `boundary_ratio`)."""
        from diffusers import AutoencoderKLWan
        from transformers import (
            CLIPImageProcessor,
            CLIPVisionConfig,
            CLIPVisionModelWithProjection,
            UMT5Config,
            UMT5EncoderModel,
        )

        tokenizer = tiny_tokenizer()
        options = self.options(model)
        ti2v = options.expand_timesteps
        two_experts = options.boundary_ratio is not None
        with seeded(0):
            text_encoder = tiny_text_encoder(UMT5EncoderModel, UMT5Config, tokenizer.vocab_size)
            if ti2v:
                vae = AutoencoderKLWan(
                    base_dim=3,
                    z_dim=48,
                    in_channels=12,
                    out_channels=12,
                    is_residual=True,
                    patch_size=2,
                    latents_mean=[0.0] * 48,
                    latents_std=[1.0] * 48,
                    dim_mult=[1, 1, 1, 1],
                    num_res_blocks=1,
                    scale_factor_spatial=16,
                    scale_factor_temporal=4,
                    temperal_downsample=[False, True, True],
                )
            else:
                vae = AutoencoderKLWan(
                    base_dim=3,
                    z_dim=16,
                    dim_mult=[1, 1, 1, 1],
                    num_res_blocks=1,
                    temperal_downsample=[False, True, True],
                )
            clip = not ti2v and not two_experts
            transformers = [self._tiny_transformer(ti2v, clip) for _ in range(2 if two_experts else 1)]
            image_encoder = (
                CLIPVisionModelWithProjection(
                    CLIPVisionConfig(
                        hidden_size=4,
                        projection_dim=4,
                        num_hidden_layers=2,
                        num_attention_heads=2,
                        image_size=32,
                        intermediate_size=16,
                        patch_size=1,
                    )
                ).eval()
                if clip
                else None
            )
        return self.pipeline_class(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=self._scheduler(model.flow_shift or 3.0),
            image_processor=CLIPImageProcessor(crop_size=32, size=32) if clip else None,
            image_encoder=image_encoder,
            transformer=transformers[0],
            transformer_2=transformers[1] if two_experts else None,
            boundary_ratio=options.boundary_ratio,
            expand_timesteps=ti2v,
        )

    @staticmethod
    def _tiny_transformer(ti2v: bool, clip: bool) -> WanTransformer3DModel:
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=TINY_HEADS,
            attention_head_dim=TINY_HEAD_DIM,
            in_channels=48 if ti2v else 36,
            out_channels=48 if ti2v else 16,
            text_dim=TINY_TEXT_DIM,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
            image_dim=4 if clip else None,
            added_kv_proj_dim=TINY_HEADS * TINY_HEAD_DIM if clip else None,
        )

    @staticmethod
    def _scheduler(flow_shift: float) -> UniPCMultistepScheduler:
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=flow_shift
        )

    def assemble(self, model: ModelConfig, modules: dict[str, Any], arch: str) -> WanImageToVideoPipeline:
        from diffusers import UniPCMultistepScheduler
        from transformers import CLIPImageProcessor

        flags = arch_json(arch, "pipeline") if (arch_folder(arch) / "pipeline.json").is_file() else {}
        processor = CLIPImageProcessor(crop_size=224, size=224) if "image_encoder" in modules else None
        return self.pipeline_class(
            tokenizer=tiny_tokenizer(model.max_sequence_length),
            scheduler=UniPCMultistepScheduler.from_config(arch_json(arch, "scheduler")),
            image_processor=processor,
            boundary_ratio=flags.get("boundary_ratio"),
            expand_timesteps=flags.get("expand_timesteps", False),
            **{"image_encoder": None, "transformer_2": None, **modules},
        )

    # --- rows ---

    def call_arguments(self, model: ModelConfig, job: Any, images: dict[str, Any], embeds: Any) -> dict[str, Any]:
        arguments = super().call_arguments(model, job, images, embeds)
        if images.get("last_image") is not None:
            arguments["last_image"] = images["last_image"]
        if (guidance_2 := self.options(model).guidance_scale_2) is not None:
            arguments["guidance_scale_2"] = guidance_2
        return arguments

    # --- structure ---

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return transformer.blocks

    def streamline(self, transformer: torch.nn.Module, model: ModelConfig) -> None:
        """Its attention with the rotary embedding written for one fused pass (wan_attention)."""
        from batch_runner.families.wan_attention import pair_rotary  # imports diffusers

        pair_rotary(transformer)

    def geometry(self, configs: dict[str, dict]) -> Geometry:
        return wan_vae_geometry(configs)


FAMILY = Wan()


def _lora_in_wan_keys(
    transformer: torch.nn.Module, down: str, up: str, rank: int, seed: int, scales: tuple[float | None, float]
) -> dict[str, torch.Tensor]:
    """A random LoRA for every attention and feed-forward linear of `transformer` (real or on the meta
    device: only its layers' shapes are read), in the original Wan checkpoints' keys. `scales`: of the
    down and up matrices (None: 1/sqrt(in_features), as an initialised layer)."""
    layers = {"self_attn": "attn1", "cross_attn": "attn2"}
    names = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "k_img": "add_k_proj", "v_img": "add_v_proj"}
    tensors = {}
    generator = torch.Generator().manual_seed(seed)
    for i, block in enumerate(transformer.blocks):
        targets = {"ffn.0": block.ffn.net[0].proj, "ffn.2": block.ffn.net[2]}
        for theirs, ours in layers.items():
            for o, c in names.items():
                attention = getattr(block, ours)
                if o.endswith("_img") and (theirs == "self_attn" or getattr(attention, c, None) is None):
                    continue
                targets[f"{theirs}.{o}"] = attention.get_submodule(c)
        for key, linear in targets.items():
            prefix = f"diffusion_model.blocks.{i}.{key}"
            down_scale = scales[0] if scales[0] is not None else linear.in_features**-0.5
            tensors[f"{prefix}.{down}.weight"] = torch.randn(rank, linear.in_features, generator=generator) * down_scale
            tensors[f"{prefix}.{up}.weight"] = torch.randn(linear.out_features, rank, generator=generator) * scales[1]
            tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
    return tensors
