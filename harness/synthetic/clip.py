"""CLIP text encoders: HF `CLIPTextModel` layout (text_model.*) and OpenCLIP layout (SDXL checkpoints).

ComfyUI 0.3.75 tells them apart by keys only (sd.py detect_te_model): `layers.30` -> CLIP-G,
`layers.0` -> CLIP-L; Flux's loader routes a file to clip_l iff `layers.1` exists. The model's
config comes from a JSON file that `model_options["model_config"]` overrides (long_clipl.py), so a
tiny file must ship that override (see `override`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import BIAS, EMBEDDING, POSITION_IDS, SCALAR, WEIGHT, SpecList, TensorSpec


@dataclass(frozen=True)
class ClipConfig:
    hidden: int
    layers: int
    heads: int
    ffn: int
    projection: bool             # top-level text_projection.weight [hidden, hidden]
    vocab: int = 49408           # the bundled CLIP BPE tokenizer emits ids up to 49407
    positions: int = 77

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"ClipConfig.hidden {self.hidden} must be a multiple of heads {self.heads}")


# openai/clip-vit-large-patch14 text tower. The published clip_l.safetensors (246 MB) has no
# text_projection (123,060,480 params x 2 B = 246.1 MB; with it, 247.3 MB).
CLIP_L_FULL = ClipConfig(hidden=768, layers=12, heads=12, ffn=3072, projection=False)
# Width 768 kept so the pooled output still fits Flux's vector_in [3072, 768]; 3 layers because
# SDXL/Flux take layer_idx -2 and ComfyUI asserts abs(layer_idx) < num_layers.
CLIP_L_TINY = ClipConfig(hidden=768, layers=3, heads=12, ffn=64, projection=False)
# OpenCLIP ViT-bigG/14 text tower, with text_projection.
CLIP_G_FULL = ClipConfig(hidden=1280, layers=32, heads=20, ffn=5120, projection=True)
# Detection needs text_model.encoder.layers.30 (so >= 31 layers; 32 as the real one); the width is
# free through the override, so it is small (a 1280-wide 32-layer tower would be 270M params).
CLIP_G_TINY = ClipConfig(hidden=64, layers=32, heads=2, ffn=128, projection=True)


def override(cfg: ClipConfig, full: ClipConfig) -> dict:
    """The ComfyUI model_options a loader must pass for `cfg` ({} when it is the full config)."""
    diff = {k: v for k, v in (("hidden_size", cfg.hidden), ("num_hidden_layers", cfg.layers),
                              ("num_attention_heads", cfg.heads), ("intermediate_size", cfg.ffn))
            if v != {"hidden_size": full.hidden, "num_hidden_layers": full.layers,
                     "num_attention_heads": full.heads, "intermediate_size": full.ffn}[k]}
    if "hidden_size" in diff:
        diff["projection_dim"] = cfg.hidden   # text_projection is [hidden, hidden]
    return {"model_config": diff} if diff else {}


def clip_hf_specs(cfg: ClipConfig, dtype: torch.dtype = torch.float16, position_ids: bool = False) \
        -> list[TensorSpec]:
    h = cfg.hidden
    s = SpecList(dtype)
    s.add("text_model.embeddings.token_embedding.weight", (cfg.vocab, h), EMBEDDING)
    s.add("text_model.embeddings.position_embedding.weight", (cfg.positions, h), EMBEDDING)
    if position_ids:
        s.add("text_model.embeddings.position_ids", (1, cfg.positions), POSITION_IDS, dtype=torch.int64)
    for i in range(cfg.layers):
        p = f"text_model.encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            s.linear(f"{p}self_attn.{proj}", h, h)
        s.norm(f"{p}layer_norm1", h)
        s.linear(f"{p}mlp.fc1", cfg.ffn, h)
        s.linear(f"{p}mlp.fc2", h, cfg.ffn)
        s.norm(f"{p}layer_norm2", h)
    s.norm("text_model.final_layer_norm", h)
    if cfg.projection:
        s.linear("text_projection", h, h, bias=False)
    return s.specs


def clip_openclip_specs(cfg: ClipConfig, dtype: torch.dtype = torch.float16) -> list[TensorSpec]:
    """OpenCLIP text tower (as in sd_xl_base_1.0's conditioner.embedders.1.model.*)."""
    h = cfg.hidden
    s = SpecList(dtype)
    s.add("token_embedding.weight", (cfg.vocab, h), EMBEDDING)
    s.add("positional_embedding", (cfg.positions, h), EMBEDDING)
    for i in range(cfg.layers):
        p = f"transformer.resblocks.{i}."
        s.norm(f"{p}ln_1", h)
        s.add(f"{p}attn.in_proj_weight", (3 * h, h), WEIGHT)     # fused q,k,v
        s.add(f"{p}attn.in_proj_bias", (3 * h,), BIAS)
        s.linear(f"{p}attn.out_proj", h, h)
        s.norm(f"{p}ln_2", h)
        s.linear(f"{p}mlp.c_fc", cfg.ffn, h)
        s.linear(f"{p}mlp.c_proj", h, cfg.ffn)
    s.norm("ln_final", h)
    if cfg.projection:
        s.add("text_projection", (h, h), WEIGHT)   # used as x @ P (ComfyUI transposes it on load)
    s.add("logit_scale", (), SCALAR)
    return s.specs

