"""T5 v1.1 XXL encoder in the layout of t5xxl_fp16.safetensors (HF T5EncoderModel keys).

The published file stores the token table twice (`shared.weight` and `encoder.embed_tokens.weight`),
which is why it is 9.79 GB rather than 9.52 GB; both are kept here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import EMBEDDING, NORM, SpecList, TensorSpec


@dataclass(frozen=True)
class T5Config:
    d_model: int = 4096
    layers: int = 24
    heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240            # gated-GELU: wi_0, wi_1 [d_ff, d_model], wo [d_model, d_ff]
    vocab: int = 32128           # the bundled T5 tokenizer's ids
    rel_buckets: int = 32

    @property
    def inner(self) -> int:
        return self.heads * self.d_kv


T5XXL_FULL = T5Config()
# d_model 4096 kept (Flux's txt_in is [3072, 4096]); 24 blocks kept because ComfyUI detects a lone
# T5-XXL file by encoder.block.23...wi_1 with in-dim 4096; attention and FFN shrunk through the override.
T5XXL_TINY = T5Config(heads=2, d_kv=32, d_ff=64)


def override(cfg: T5Config, full: T5Config) -> dict:
    diff = {k: getattr(cfg, a) for k, a in (("d_model", "d_model"), ("num_layers", "layers"),
                                            ("num_heads", "heads"), ("d_kv", "d_kv"), ("d_ff", "d_ff"))
            if getattr(cfg, a) != getattr(full, a)}
    return {"t5xxl_model_config": diff} if diff else {}


def t5_specs(cfg: T5Config, dtype: torch.dtype = torch.float16) -> list[TensorSpec]:
    d = cfg.d_model
    s = SpecList(dtype)
    s.add("shared.weight", (cfg.vocab, d), EMBEDDING)
    s.add("encoder.embed_tokens.weight", (cfg.vocab, d), EMBEDDING)
    for i in range(cfg.layers):
        p = f"encoder.block.{i}.layer."
        for n in ("q", "k", "v"):
            s.linear(f"{p}0.SelfAttention.{n}", cfg.inner, d, bias=False)
        s.linear(f"{p}0.SelfAttention.o", d, cfg.inner, bias=False)
        if i == 0:   # relative position bias lives in the first block only, shared by the rest
            s.add(f"{p}0.SelfAttention.relative_attention_bias.weight", (cfg.rel_buckets, cfg.heads), EMBEDDING)
        s.add(f"{p}0.layer_norm.weight", (d,), NORM)
        s.linear(f"{p}1.DenseReluDense.wi_0", cfg.d_ff, d, bias=False)
        s.linear(f"{p}1.DenseReluDense.wi_1", cfg.d_ff, d, bias=False)
        s.linear(f"{p}1.DenseReluDense.wo", d, cfg.d_ff, bias=False)
        s.add(f"{p}1.layer_norm.weight", (d,), NORM)
    s.add("encoder.final_layer_norm.weight", (d,), NORM)
    return s.specs
