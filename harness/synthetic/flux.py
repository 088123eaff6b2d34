"""Flux.1 DiT (BFL key layout, as in flux1-dev.safetensors / flux1-schnell.safetensors).

ComfyUI 0.3.75 detection (model_detection.py, Flux branch) hard-codes 24 heads and axes [16,56,56]
(head_dim 128), so the width must stay 3072; only the block counts and `guidance_in` are free.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import NORM, SpecList, TensorSpec


@dataclass(frozen=True)
class FluxConfig:
    hidden: int = 3072
    in_channels: int = 64        # 16 latent channels x 2x2 patch
    vec_in_dim: int = 768        # CLIP-L pooled
    context_in_dim: int = 4096   # T5-XXL
    mlp_ratio: int = 4
    head_dim: int = 128
    depth: int = 19              # double blocks
    depth_single: int = 38
    guidance: bool = True        # dev has guidance_in; schnell does not

    def __post_init__(self):
        if self.hidden % self.head_dim:
            raise ValueError(f"FluxConfig.hidden {self.hidden} must be a multiple of head_dim {self.head_dim}")
        if self.depth < 1:
            raise ValueError("FluxConfig.depth must be >= 1: ComfyUI detects Flux by double_blocks.0.*")


DEV_FULL = FluxConfig()
DEV_TINY = FluxConfig(depth=1, depth_single=1)
SCHNELL_FULL = FluxConfig(guidance=False)
SCHNELL_TINY = FluxConfig(depth=1, depth_single=1, guidance=False)


def flux_specs(cfg: FluxConfig, dtype: torch.dtype = torch.bfloat16) -> list[TensorSpec]:
    h, mlp = cfg.hidden, cfg.hidden * cfg.mlp_ratio
    s = SpecList(dtype)
    s.linear("img_in", h, cfg.in_channels)
    s.linear("time_in.in_layer", h, 256)          # sinusoidal timestep embedding is 256-d
    s.linear("time_in.out_layer", h, h)
    s.linear("vector_in.in_layer", h, cfg.vec_in_dim)
    s.linear("vector_in.out_layer", h, h)
    if cfg.guidance:
        s.linear("guidance_in.in_layer", h, 256)
        s.linear("guidance_in.out_layer", h, h)
    s.linear("txt_in", h, cfg.context_in_dim)
    for i in range(cfg.depth):
        p = f"double_blocks.{i}."
        for stream in ("img", "txt"):
            s.linear(f"{p}{stream}_mod.lin", 6 * h, h)            # shift/scale/gate x2
            s.linear(f"{p}{stream}_attn.qkv", 3 * h, h)
            s.add(f"{p}{stream}_attn.norm.query_norm.scale", (cfg.head_dim,), NORM)
            s.add(f"{p}{stream}_attn.norm.key_norm.scale", (cfg.head_dim,), NORM)
            s.linear(f"{p}{stream}_attn.proj", h, h)
            s.linear(f"{p}{stream}_mlp.0", mlp, h)
            s.linear(f"{p}{stream}_mlp.2", h, mlp)
    for i in range(cfg.depth_single):
        p = f"single_blocks.{i}."
        s.linear(f"{p}linear1", 3 * h + mlp, h)                  # fused qkv + MLP in: [21504, 3072]
        s.linear(f"{p}linear2", h, h + mlp)                      # attn out + MLP out: [3072, 15360]
        s.add(f"{p}norm.query_norm.scale", (cfg.head_dim,), NORM)
        s.add(f"{p}norm.key_norm.scale", (cfg.head_dim,), NORM)
        s.linear(f"{p}modulation.lin", 3 * h, h)
    s.linear("final_layer.linear", cfg.in_channels, h)
    s.linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return s.specs
