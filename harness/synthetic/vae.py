"""KL autoencoders in the ldm key layout (encoder.*, decoder.*): the Flux AE and the SDXL VAE.

Both have the same trunk (ch 128, mult [1,2,4,4], 2 res blocks, one mid attention). ComfyUI 0.3.75
(sd.py VAE) tells them apart by decoder.conv_in's in-channels (16 vs 4) and the presence of
post_quant_conv; it assumes the SD x4-upscaler VAE unless encoder.down.2.downsample exists, so the
full key set is always written (84M params: tiny = full).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import SpecList, TensorSpec


@dataclass(frozen=True)
class VAEConfig:
    z_channels: int              # latent channels: 16 (Flux AE) / 4 (SDXL)
    quant_conv: bool             # SDXL KL-f8 has quant_conv/post_quant_conv; the Flux AE has not
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3


FLUX_AE = VAEConfig(z_channels=16, quant_conv=False)
SDXL_VAE = VAEConfig(z_channels=4, quant_conv=True)


def _resnet(s: SpecList, p: str, c_in: int, c_out: int) -> None:
    s.norm(f"{p}norm1", c_in)
    s.conv(f"{p}conv1", c_out, c_in, 3)
    s.norm(f"{p}norm2", c_out)
    s.conv(f"{p}conv2", c_out, c_out, 3)
    if c_in != c_out:
        s.conv(f"{p}nin_shortcut", c_out, c_in, 1)


def _mid(s: SpecList, p: str, c: int) -> None:
    _resnet(s, f"{p}block_1.", c, c)
    s.norm(f"{p}attn_1.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        s.conv(f"{p}attn_1.{n}", c, c, 1)     # single-head attention as 1x1 convs
    _resnet(s, f"{p}block_2.", c, c)


def vae_specs(cfg: VAEConfig, dtype: torch.dtype = torch.float32) -> list[TensorSpec]:
    s = SpecList(dtype)
    chs = [cfg.ch * m for m in cfg.ch_mult]          # [128, 256, 512, 512]
    # encoder: conv_in -> down levels (downsample on all but the last) -> mid -> 2*z moments
    s.conv("encoder.conv_in", cfg.ch, cfg.in_channels, 3)
    c = cfg.ch
    for lvl, c_out in enumerate(chs):
        for b in range(cfg.num_res_blocks):
            _resnet(s, f"encoder.down.{lvl}.block.{b}.", c, c_out)
            c = c_out
        if lvl != len(chs) - 1:
            s.conv(f"encoder.down.{lvl}.downsample.conv", c, c, 3)
    _mid(s, "encoder.mid.", c)
    s.norm("encoder.norm_out", c)
    s.conv("encoder.conv_out", 2 * cfg.z_channels, c, 3)
    # decoder: z -> widest -> up levels from the last (upsample on all but level 0) -> RGB
    c = chs[-1]
    s.conv("decoder.conv_in", c, cfg.z_channels, 3)
    _mid(s, "decoder.mid.", c)
    for lvl in reversed(range(len(chs))):
        for b in range(cfg.num_res_blocks + 1):
            _resnet(s, f"decoder.up.{lvl}.block.{b}.", c, chs[lvl])
            c = chs[lvl]
        if lvl != 0:
            s.conv(f"decoder.up.{lvl}.upsample.conv", c, c, 3)
    s.norm("decoder.norm_out", c)
    s.conv("decoder.conv_out", cfg.in_channels, c, 3)
    if cfg.quant_conv:
        s.conv("quant_conv", 2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        s.conv("post_quant_conv", cfg.z_channels, cfg.z_channels, 1)
    return s.specs
