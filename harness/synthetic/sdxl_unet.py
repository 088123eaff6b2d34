"""SDXL UNet (ldm/sgm key layout, `openaimodel.UNetModel`), without the checkpoint prefix.

ComfyUI 0.3.75 derives the whole topology from the keys and routes it to a supported model only on an
exact unet_config match: SDXL needs depths [0,0,2,2,10,10]. The smallest topology still routed to
`model_base.SDXL` is Segmind-Vega's (supported_models.Segmind_Vega, a subclass of SDXL): input
depths [0,0,1,1,2,2], output [0,0,0,1,1,1,2,2,2], middle block = one ResBlock (depth -1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import SpecList, TensorSpec


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int = 320
    in_channels: int = 4
    out_channels: int = 4
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 0, 2, 2, 10, 10)          # one per input ResBlock
    transformer_depth_output: tuple[int, ...] = (0, 0, 0, 2, 2, 2, 10, 10, 10)
    transformer_depth_middle: int = 10   # -1: middle is a single ResBlock, no attention
    context_dim: int = 2048              # CLIP-L 768 + CLIP-G 1280
    adm_in_channels: int = 2816          # CLIP-G pooled 1280 + 6 x 256 size/crop embeddings
    head_channels: int = 64

    def __post_init__(self):
        n_in = len(self.channel_mult) * self.num_res_blocks
        if len(self.transformer_depth) != n_in:
            raise ValueError(f"UNetConfig.transformer_depth needs {n_in} entries, got {self.transformer_depth}")
        if len(self.transformer_depth_output) != len(self.channel_mult) * (self.num_res_blocks + 1):
            raise ValueError("UNetConfig.transformer_depth_output needs one entry per output block")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


SDXL_FULL = UNetConfig()
SDXL_TINY = UNetConfig(transformer_depth=(0, 0, 1, 1, 2, 2), transformer_depth_output=(0, 0, 0, 1, 1, 1, 2, 2, 2),
                       transformer_depth_middle=-1)


def _resblock(s: SpecList, p: str, c_in: int, c_out: int, emb: int) -> None:
    s.norm(f"{p}in_layers.0", c_in)                 # GroupNorm(32)
    s.conv(f"{p}in_layers.2", c_out, c_in, 3)
    s.linear(f"{p}emb_layers.1", c_out, emb)
    s.norm(f"{p}out_layers.0", c_out)
    s.conv(f"{p}out_layers.3", c_out, c_out, 3)
    if c_in != c_out:
        s.conv(f"{p}skip_connection", c_out, c_in, 1)


def _transformer(s: SpecList, p: str, c: int, depth: int, ctx: int) -> None:
    inner = c                                       # heads * 64 == channels
    s.norm(f"{p}norm", c)
    s.linear(f"{p}proj_in", inner, c)               # use_linear_in_transformer: 2-D proj
    for i in range(depth):
        b = f"{p}transformer_blocks.{i}."
        for attn, kv_dim in (("attn1", inner), ("attn2", ctx)):
            s.linear(f"{b}{attn}.to_q", inner, inner, bias=False)
            s.linear(f"{b}{attn}.to_k", inner, kv_dim, bias=False)
            s.linear(f"{b}{attn}.to_v", inner, kv_dim, bias=False)
            s.linear(f"{b}{attn}.to_out.0", inner, inner)
        s.linear(f"{b}ff.net.0.proj", inner * 4 * 2, inner)   # GEGLU: value and gate
        s.linear(f"{b}ff.net.2", inner, inner * 4)
        for n in ("norm1", "norm2", "norm3"):
            s.norm(f"{b}{n}", inner)
    s.linear(f"{p}proj_out", c, inner)


def unet_specs(cfg: UNetConfig, dtype: torch.dtype = torch.float16) -> list[TensorSpec]:
    mc, emb = cfg.model_channels, cfg.time_embed_dim
    s = SpecList(dtype)
    s.linear("time_embed.0", emb, mc)
    s.linear("time_embed.2", emb, emb)
    s.linear("label_emb.0.0", emb, cfg.adm_in_channels)
    s.linear("label_emb.0.2", emb, emb)
    s.conv("input_blocks.0.0", mc, cfg.in_channels, 3)
    chans, ch, n, depth_in = [mc], mc, 1, iter(cfg.transformer_depth)
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            _resblock(s, f"input_blocks.{n}.0.", ch, mult * mc, emb)
            ch = mult * mc
            d = next(depth_in)
            if d:
                _transformer(s, f"input_blocks.{n}.1.", ch, d, cfg.context_dim)
            chans.append(ch)
            n += 1
        if level != len(cfg.channel_mult) - 1:
            s.conv(f"input_blocks.{n}.0.op", ch, ch, 3)   # stride-2 downsample
            chans.append(ch)
            n += 1
    if cfg.transformer_depth_middle >= -1:
        _resblock(s, "middle_block.0.", ch, ch, emb)
        if cfg.transformer_depth_middle >= 0:
            _transformer(s, "middle_block.1.", ch, cfg.transformer_depth_middle, cfg.context_dim)
            _resblock(s, "middle_block.2.", ch, ch, emb)
    depth_out = list(reversed(cfg.transformer_depth_output))   # ComfyUI pops from the end
    n = 0
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            skip = chans.pop()
            _resblock(s, f"output_blocks.{n}.0.", ch + skip, mult * mc, emb)
            ch = mult * mc
            d = depth_out[n]
            if d:
                _transformer(s, f"output_blocks.{n}.1.", ch, d, cfg.context_dim)
            if level and i == cfg.num_res_blocks:
                s.conv(f"output_blocks.{n}.{2 if d else 1}.conv", ch, ch, 3)   # nearest-2x upsample conv
            n += 1
    s.norm("out.0", ch)
    s.conv("out.2", cfg.out_channels, mc, 3)
    return s.specs
