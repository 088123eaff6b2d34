"""All-in-one SDXL checkpoint in the layout of sd_xl_base_1.0.safetensors (sgm prefixes).

  model.diffusion_model.*                     UNet (sdxl_unet.py)
  conditioner.embedders.0.transformer.*       CLIP-L, HF CLIPTextModel layout, no text_projection,
                                              with the int64 position_ids buffer
  conditioner.embedders.1.model.*             CLIP-G, OpenCLIP layout (+ text_projection, logit_scale)
  first_stage_model.*                         SDXL VAE with quant_conv/post_quant_conv

The tiny variant swaps only the UNet for Segmind-Vega's topology: the text towers stay full size so
that ComfyUI's stock CheckpointLoaderSimple (which passes no model_options) loads and runs it, and
their outputs keep the UNet's context 2048 / adm 2816 inputs valid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import clip, sdxl_unet, vae
from .spec import TensorSpec, check_unique, with_prefix


@dataclass(frozen=True)
class SDXLCheckpointConfig:
    unet: sdxl_unet.UNetConfig
    clip_l: clip.ClipConfig = clip.CLIP_L_FULL
    clip_g: clip.ClipConfig = clip.CLIP_G_FULL
    vae: vae.VAEConfig = vae.SDXL_VAE


SDXL_CKPT_FULL = SDXLCheckpointConfig(unet=sdxl_unet.SDXL_FULL)
SDXL_CKPT_TINY = SDXLCheckpointConfig(unet=sdxl_unet.SDXL_TINY)


def sdxl_checkpoint_specs(cfg: SDXLCheckpointConfig, dtype: torch.dtype = torch.float16) -> list[TensorSpec]:
    specs = (with_prefix(sdxl_unet.unet_specs(cfg.unet, dtype), "model.diffusion_model.")
             + with_prefix(clip.clip_hf_specs(cfg.clip_l, dtype, position_ids=True),
                           "conditioner.embedders.0.transformer.")
             + with_prefix(clip.clip_openclip_specs(cfg.clip_g, dtype), "conditioner.embedders.1.model.")
             + with_prefix(vae.vae_specs(cfg.vae, dtype), "first_stage_model."))
    return check_unique(specs, "sdxl checkpoint")
