"""Next-DiT family in ComfyUI's native key layout: NewBie-image-Exp0.1 and Z-Image-Turbo.

ComfyUI 0.3.75 (model_detection.py, "Lumina 2" branch) reads dim = cap_embedder.1.weight.shape[0],
cap_feat_dim = .shape[1] and counts layers.N; everything else is hard-coded per dim (2304 ->
Lumina2 heads 24/8, 3840 -> Z-Image heads 30/30, 256-d adaLN, pad tokens). So a tiny variant may
only drop main layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import EMBEDDING, NORM, SpecList, TensorSpec


@dataclass(frozen=True)
class NextDiTConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int              # SwiGLU width (w1/w3 out, w2 in)
    cap_feat_dim: int            # text-encoder hidden size (Gemma-3-4B / Qwen3-4B: 2560)
    adaln_dim: int               # adaLN input: min(dim, 1024) (Lumina) or 256 (Z-Image)
    n_refiner_layers: int = 2
    in_channels: int = 16
    patch_size: int = 2
    z_image: bool = False        # 256-d adaLN without SiLU index, x/cap pad tokens
    clip_text_dim: int = 0       # NewBie's Jina pooled path (1024), 0 = absent

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"NextDiTConfig: dim {self.dim} / heads {self.n_heads} / kv {self.n_kv_heads} "
                             "must divide evenly")
        if self.n_layers < 0:
            raise ValueError("NextDiTConfig.n_layers must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# 36 layers, dim 2304, 24/8 heads, FFN 4*2304, cap_feat 2560 (Gemma-3-4B), Jina pooled 1024.
NEWBIE_FULL = NextDiTConfig(dim=2304, n_layers=36, n_heads=24, n_kv_heads=8, ffn_hidden=9216,
                            cap_feat_dim=2560, adaln_dim=1024, clip_text_dim=1024)
# One main layer kept (0 is detected too) so block-offload/quantization code has a block to work on.
NEWBIE_TINY = NextDiTConfig(dim=2304, n_layers=1, n_heads=24, n_kv_heads=8, ffn_hidden=9216,
                            cap_feat_dim=2560, adaln_dim=1024, clip_text_dim=1024)
# dim 3840, 30 layers, 30 heads (no GQA), FFN int(8/3*3840)=10240, 256-d adaLN.
ZIMAGE_FULL = NextDiTConfig(dim=3840, n_layers=30, n_heads=30, n_kv_heads=30, ffn_hidden=10240,
                            cap_feat_dim=2560, adaln_dim=256, z_image=True)
ZIMAGE_TINY = NextDiTConfig(dim=3840, n_layers=1, n_heads=30, n_kv_heads=30, ffn_hidden=10240,
                            cap_feat_dim=2560, adaln_dim=256, z_image=True)


def _block(s: SpecList, p: str, cfg: NextDiTConfig, modulation: bool) -> None:
    d, hd = cfg.dim, cfg.head_dim
    s.linear(f"{p}attention.qkv", (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, d, bias=False)  # fused GQA qkv
    s.linear(f"{p}attention.out", d, cfg.n_heads * hd, bias=False)
    s.add(f"{p}attention.q_norm.weight", (hd,), NORM)
    s.add(f"{p}attention.k_norm.weight", (hd,), NORM)
    s.linear(f"{p}feed_forward.w1", cfg.ffn_hidden, d, bias=False)
    s.linear(f"{p}feed_forward.w2", d, cfg.ffn_hidden, bias=False)
    s.linear(f"{p}feed_forward.w3", cfg.ffn_hidden, d, bias=False)
    for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
        s.add(f"{p}{n}.weight", (d,), NORM)
    if modulation:
        # Z-Image: Sequential(Linear) -> index 0; Lumina: Sequential(SiLU, Linear) -> index 1.
        idx = 0 if cfg.z_image else 1
        s.linear(f"{p}adaLN_modulation.{idx}", 4 * d, cfg.adaln_dim)


def nextdit_specs(cfg: NextDiTConfig, dtype: torch.dtype = torch.bfloat16) -> list[TensorSpec]:
    d, t_hidden = cfg.dim, min(cfg.dim, 1024)
    s = SpecList(dtype)
    s.linear("x_embedder", d, cfg.patch_size ** 2 * cfg.in_channels)
    for i in range(cfg.n_refiner_layers):
        _block(s, f"noise_refiner.{i}.", cfg, modulation=True)
    for i in range(cfg.n_refiner_layers):
        _block(s, f"context_refiner.{i}.", cfg, modulation=False)
    s.linear("t_embedder.mlp.0", t_hidden, 256)              # 256-d sinusoidal timestep features
    s.linear("t_embedder.mlp.2", cfg.adaln_dim, t_hidden)
    s.add("cap_embedder.0.weight", (cfg.cap_feat_dim,), NORM)  # RMSNorm over the text features
    s.linear("cap_embedder.1", d, cfg.cap_feat_dim)
    for i in range(cfg.n_layers):
        _block(s, f"layers.{i}.", cfg, modulation=True)
    s.add("norm_final.weight", (d,), NORM)
    s.linear("final_layer.linear", cfg.patch_size ** 2 * cfg.in_channels, d)
    s.linear("final_layer.adaLN_modulation.1", d, cfg.adaln_dim)
    if cfg.z_image:
        s.add("x_pad_token", (1, d), EMBEDDING)
        s.add("cap_pad_token", (1, d), EMBEDDING)
    if cfg.clip_text_dim:
        # NewBie: adaln = time_text_embed(cat[t_emb, clip_text_pooled_proj(jina_pooled)]).
        c = cfg.clip_text_dim
        s.add("clip_text_pooled_proj.0.weight", (c,), NORM)
        s.linear("clip_text_pooled_proj.1", c, c)
        s.linear("time_text_embed.1", t_hidden, t_hidden + c)
    return s.specs
