"""Decoder-only LLM text encoders in ComfyUI's layout (comfy/text_encoders/llama.py `Llama2_`):
Gemma-3-4B-it (NewBie) and Qwen3-4B (Z-Image). Keys: model.embed_tokens, model.layers.N.{self_attn,
mlp, norms}, model.norm; no lm_head (ComfyUI uses hidden states only).

ComfyUI detects them by keys (sd.py detect_te_model): post_feedforward_layernorm + q_norm -> Gemma-3-4B;
post_attention_layernorm + q_norm without it -> Qwen3-4B. The config comes from a dataclass that
model_options["<name>_model_config"] overrides; head_dim is a class constant (256 / 128).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import BYTES, EMBEDDING, NORM, NORM_ZC, SpecList, TensorSpec
from .spm import VOCAB_SIZE, tokenizer_model_bytes


@dataclass(frozen=True)
class LLMConfig:
    family: str                  # "gemma3" | "qwen3"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    def __post_init__(self):
        if self.family not in _FAMILY:
            raise ValueError(f"LLMConfig.family {self.family!r}: use one of {sorted(_FAMILY)}")
        if self.layers < 3:
            # Both take hidden layer -2 and ComfyUI asserts abs(layer_idx) < num_layers.
            raise ValueError("LLMConfig.layers must be >= 3")


# family -> (ComfyUI model name for the override key, norm kind, extra per-layer norms, embeds a tokenizer)
_FAMILY = {
    # Gemma RMSNorm applies (1 + w): its stored gains are centred on 0.
    "gemma3": ("gemma3_4b", NORM_ZC, ("pre_feedforward_layernorm", "post_feedforward_layernorm"), True),
    # Qwen3 ships no tokenizer in the file: ComfyUI bundles the Qwen2 BPE files.
    "qwen3": ("qwen3_4b", NORM, (), False),
}

GEMMA3_4B_FULL = LLMConfig("gemma3", hidden=2560, layers=34, heads=8, kv_heads=4, head_dim=256, ffn=10240,
                           vocab=262208)
# Width 2560 kept (NewBie's cap_embedder takes 2560-d features); vocab shrunk to the embedded
# SentencePiece model's size, which bounds every id the tokenizer emits.
GEMMA3_4B_TINY = LLMConfig("gemma3", hidden=2560, layers=3, heads=1, kv_heads=1, head_dim=256, ffn=64,
                           vocab=VOCAB_SIZE)
QWEN3_4B_FULL = LLMConfig("qwen3", hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, ffn=9728,
                          vocab=151936)
# Width 2560 kept (Z-Image's cap_feat_dim); the full vocab too: the bundled Qwen tokenizer's chat
# template emits <|im_start|> = 151644.
QWEN3_4B_TINY = LLMConfig("qwen3", hidden=2560, layers=3, heads=1, kv_heads=1, head_dim=128, ffn=64,
                          vocab=151936)


def override(cfg: LLMConfig, full: LLMConfig) -> dict:
    fields = (("hidden_size", "hidden"), ("num_hidden_layers", "layers"), ("num_attention_heads", "heads"),
              ("num_key_value_heads", "kv_heads"), ("intermediate_size", "ffn"), ("vocab_size", "vocab"))
    diff = {k: getattr(cfg, a) for k, a in fields if getattr(cfg, a) != getattr(full, a)}
    return {f"{_FAMILY[cfg.family][0]}_model_config": diff} if diff else {}


def llm_specs(cfg: LLMConfig, dtype: torch.dtype = torch.bfloat16) -> list[TensorSpec]:
    _, norm_kind, extra_norms, spiece = _FAMILY[cfg.family]
    h, hd = cfg.hidden, cfg.head_dim
    s = SpecList(dtype)
    s.add("model.embed_tokens.weight", (cfg.vocab, h), EMBEDDING)
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        s.linear(f"{p}self_attn.q_proj", cfg.heads * hd, h, bias=False)
        s.linear(f"{p}self_attn.k_proj", cfg.kv_heads * hd, h, bias=False)
        s.linear(f"{p}self_attn.v_proj", cfg.kv_heads * hd, h, bias=False)
        s.linear(f"{p}self_attn.o_proj", h, cfg.heads * hd, bias=False)
        s.add(f"{p}self_attn.q_norm.weight", (hd,), norm_kind)
        s.add(f"{p}self_attn.k_norm.weight", (hd,), norm_kind)
        s.linear(f"{p}mlp.gate_proj", cfg.ffn, h, bias=False)
        s.linear(f"{p}mlp.up_proj", cfg.ffn, h, bias=False)
        s.linear(f"{p}mlp.down_proj", h, cfg.ffn, bias=False)
        for n in ("input_layernorm", "post_attention_layernorm") + extra_norms:
            s.add(f"{p}{n}.weight", (h,), norm_kind)
    s.add("model.norm.weight", (h,), norm_kind)
    if spiece:
        payload = tokenizer_model_bytes()
        s.add("spiece_model", (len(payload),), BYTES, dtype=torch.uint8, data=lambda: payload)
    return s.specs
