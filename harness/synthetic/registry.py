"""The table of synthetic models: CLI name -> folder, file name, spec builder per size, dtype.

`folder`/`filename` follow ComfyUI's models-folder layout and the names users' real files have, so
a models dir filled by `ensure` can be handed to ComfyUI as-is.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import checkpoint, clip, flux, jina, llm, lora, nextdit, t5, vae
from .spec import TensorSpec

# Bump when any key generator, config or init rule changes: cached files are then rewritten.
SPEC_VERSION = 1
SIZES = ("tiny", "full")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    folder: str                     # ComfyUI models sub-folder
    filename: str
    build: Callable[[Any, torch.dtype], list[TensorSpec]]
    configs: dict[str, Any]         # size -> frozen config dataclass
    dtype: torch.dtype
    description: str
    # size -> ComfyUI model_options a loader must pass (tiny text encoders: a config override).
    model_options: dict[str, dict] = field(default_factory=dict)

    def specs(self, size: str) -> list[TensorSpec]:
        return self.build(self.config(size), self.dtype)

    def config(self, size: str):
        if size not in self.configs:
            raise ValueError(f"{self.name}: unknown size {size!r}; use one of {sorted(self.configs)}")
        return self.configs[size]

    def config_dict(self, size: str) -> dict:
        return _jsonable(dataclasses.asdict(self.config(size)))


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    return x


def _flux(name, filename, full, tiny, what):
    return ModelEntry(name, "diffusion_models", filename, flux.flux_specs, {"full": full, "tiny": tiny},
                      torch.bfloat16, what)


def _te(name, filename, module, builder, full, tiny, dtype, what):
    return ModelEntry(name, "text_encoders", filename, builder, {"full": full, "tiny": tiny}, dtype, what,
                      {"tiny": module.override(tiny, full)})


def _vae(name, filename, cfg, what):
    # 84M params: tiny = full (ComfyUI needs every level to recognise the VAE at all).
    return ModelEntry(name, "vae", filename, vae.vae_specs, {"full": cfg, "tiny": cfg}, torch.float32, what)


_ENTRIES = [
    _flux("flux-dev", "flux1-dev.safetensors", flux.DEV_FULL, flux.DEV_TINY,
          "Flux.1-dev DiT, BFL keys, with guidance_in (tiny: 1 double + 1 single block)"),
    _flux("flux-schnell", "flux1-schnell.safetensors", flux.SCHNELL_FULL, flux.SCHNELL_TINY,
          "Flux.1-schnell DiT, no guidance_in (tiny: 1 double + 1 single block)"),
    ModelEntry("sdxl", "checkpoints", "sd_xl_base_1.0.safetensors", checkpoint.sdxl_checkpoint_specs,
               {"full": checkpoint.SDXL_CKPT_FULL, "tiny": checkpoint.SDXL_CKPT_TINY}, torch.float16,
               "SDXL base all-in-one checkpoint: UNet + CLIP-L + CLIP-G (OpenCLIP) + VAE "
               "(tiny: Segmind-Vega UNet topology, full text towers and VAE)"),
    ModelEntry("newbie", "diffusion_models", "NewBie-Image-Exp0.1.safetensors", nextdit.nextdit_specs,
               {"full": nextdit.NEWBIE_FULL, "tiny": nextdit.NEWBIE_TINY}, torch.bfloat16,
               "NewBie-image Exp0.1 Next-DiT, 36 layers, cap_feat 2560, Jina pooled path (tiny: 1 layer)"),
    ModelEntry("z-image-turbo", "diffusion_models", "z_image_turbo_bf16.safetensors", nextdit.nextdit_specs,
               {"full": nextdit.ZIMAGE_FULL, "tiny": nextdit.ZIMAGE_TINY}, torch.bfloat16,
               "Z-Image-Turbo S3-DiT, dim 3840, 30 layers (tiny: 1 layer)"),
    ModelEntry("z-image-turbo-distill-lora", "loras", "z_image_turbo_distill_patch_lora_bf16.safetensors",
               lora.nextdit_lora_specs, {"full": lora.ZIMAGE_DISTILL_FULL, "tiny": lora.ZIMAGE_DISTILL_TINY},
               torch.bfloat16, "Z-Image-Turbo distill-patch LoRA, rank 32 on q/k/v/out/w1/w2/w3 of all 34 "
               "blocks, ComfyUI keys (tiny: the tiny model's 5 blocks)"),
    _te("clip-l", "clip_l.safetensors", clip, clip.clip_hf_specs, clip.CLIP_L_FULL, clip.CLIP_L_TINY,
        torch.float16, "CLIP-L text encoder, HF keys (tiny: 3 layers, FFN 64, width 768)"),
    _te("clip-g", "clip_g.safetensors", clip, clip.clip_hf_specs, clip.CLIP_G_FULL, clip.CLIP_G_TINY,
        torch.float16, "CLIP-G text encoder, HF keys + text_projection (tiny: 32 layers, width 64)"),
    _te("t5xxl", "t5xxl_fp16.safetensors", t5, t5.t5_specs, t5.T5XXL_FULL, t5.T5XXL_TINY, torch.float16,
        "T5 v1.1 XXL encoder (tiny: 24 blocks, d_model 4096, 2 heads x 32, FFN 64)"),
    _te("gemma3-4b", "gemma_3_4b_it_bf16.safetensors", llm, llm.llm_specs, llm.GEMMA3_4B_FULL,
        llm.GEMMA3_4B_TINY, torch.bfloat16,
        "Gemma-3-4B-it text encoder, ComfyUI layout + spiece_model (tiny: 3 layers, 1 head, vocab 512)"),
    _te("qwen3-4b", "qwen_3_4b.safetensors", llm, llm.llm_specs, llm.QWEN3_4B_FULL, llm.QWEN3_4B_TINY,
        torch.bfloat16, "Qwen3-4B text encoder, ComfyUI layout (tiny: 3 layers, 1 head, FFN 64)"),
    _te("jina-clip-v2", "jina_clip_v2_bf16.safetensors", jina, jina.jina_specs, jina.JINA_FULL, jina.JINA_TINY,
        torch.bfloat16, "Jina CLIP v2 text tower (NewBie), ComfyUI layout + spiece_model (tiny: 2 layers, FFN 64)"),
    _vae("flux-ae", "ae.safetensors", vae.FLUX_AE, "Flux AE, 16 latent channels, ldm keys, fp32"),
    _vae("sdxl-vae", "sdxl_vae.safetensors", vae.SDXL_VAE, "SDXL KL VAE, 4 latent channels, ldm keys, fp32"),
]

REGISTRY: dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}


class UnknownModelError(KeyError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self):
        return f"unknown synthetic model {self.name!r}; known names: {', '.join(REGISTRY)}"


def get(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(name) from None
