"""LoRA files for the Next-DiT family, in the key form ComfyUI 0.3.75's LoRA loader maps.

Modelled on Comfy-Org/z_image_turbo's `z_image_turbo_distill_patch_lora_bf16.safetensors` (158,826,336
bytes): rank 32 on the 7 linear projections of every block - attention to_q/to_k/to_v/to_out.0 (the
diffusers names) and feed_forward w1/w2/w3 - of the 30 main layers, 2 noise_refiner and 2 context_refiner
blocks, 238 projections, no alpha, bf16. Its tensors are 79,380,480 parameters = 158,760,960 bytes; the
rest of the published file is its header.

Keys: `diffusion_model.<block>.<projection>.lora_down.weight` [rank, in] and `.lora_up.weight` [out, rank].
comfy/lora.py model_lora_keys_unet maps them for a Lumina2/Z-Image model: `.to_q/.to_k/.to_v` (through
comfy.utils.z_image_to_diffusers) to row slices [0:dim], [dim:2*dim], [2*dim:3*dim] of the fused
`attention.qkv.weight`, `.to_out.0` to `attention.out.weight`, `feed_forward.w*` to themselves. A tiny
variant covers exactly the blocks of the tiny Z-Image model (layers.0 plus the refiners), so every key
finds a weight there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import nextdit
from .spec import LORA, SpecList, TensorSpec


@dataclass(frozen=True)
class NextDiTLoraConfig:
    base: nextdit.NextDiTConfig    # the model the LoRA is for (its block count and widths)
    rank: int

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"NextDiTLoraConfig.rank must be >= 1, got {self.rank}")
        if self.base.n_heads != self.base.n_kv_heads:
            # to_k/to_v would be narrower than to_q; ComfyUI's z_image_to_diffusers slices dim-wide rows.
            raise ValueError("NextDiTLoraConfig: split to_q/to_k/to_v need n_heads == n_kv_heads (Z-Image)")


ZIMAGE_DISTILL_FULL = NextDiTLoraConfig(base=nextdit.ZIMAGE_FULL, rank=32)
ZIMAGE_DISTILL_TINY = NextDiTLoraConfig(base=nextdit.ZIMAGE_TINY, rank=32)


def _projections(base: nextdit.NextDiTConfig) -> dict[str, tuple[int, int]]:
    """Projection name -> (out features, in features) of one block's weight."""
    d, f = base.dim, base.ffn_hidden
    return {"attention.to_q": (d, d), "attention.to_k": (d, d), "attention.to_v": (d, d),
            "attention.to_out.0": (d, d),
            "feed_forward.w1": (f, d), "feed_forward.w2": (d, f), "feed_forward.w3": (f, d)}


def blocks(base: nextdit.NextDiTConfig) -> list[str]:
    return ([f"layers.{i}" for i in range(base.n_layers)]
            + [f"noise_refiner.{i}" for i in range(base.n_refiner_layers)]
            + [f"context_refiner.{i}" for i in range(base.n_refiner_layers)])


def nextdit_lora_specs(cfg: NextDiTLoraConfig, dtype: torch.dtype = torch.bfloat16) -> list[TensorSpec]:
    """Down [rank, in] and up [out, rank] factors per projection per block.

    >>> specs = nextdit_lora_specs(ZIMAGE_DISTILL_TINY)
    >>> len(specs), specs[0].key, specs[0].shape
    (70, 'diffusion_model.layers.0.attention.to_q.lora_down.weight', (32, 3840))
    """
    s = SpecList(dtype, prefix="diffusion_model.")
    for block in blocks(cfg.base):
        for name, (out_f, in_f) in _projections(cfg.base).items():
            s.add(f"{block}.{name}.lora_down.weight", (cfg.rank, in_f), LORA)
            s.add(f"{block}.{name}.lora_up.weight", (out_f, cfg.rank), LORA)
    return s.specs
