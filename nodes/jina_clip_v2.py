"""Jina CLIP v2's text tower (Jina-XLM-RoBERTa) in plain PyTorch; no ComfyUI import, no remote code.

NewBie-image feeds the tower's mean-pooled output (1024-d) to its DiT's pooled path. Architecture facts
(checked against jinaai/xlm-roberta-flash-implementation, transformers' JinaEmbeddingsV3 and ComfyUI's
later comfy/text_encoders/jina_clip_2.py):
- token embedding [V, D] + token-type embedding 0 [1, D], then LayerNorm `emb_ln`; no position table;
- N post-norm blocks: x = norm1(x + out_proj(attn)); x = norm2(x + fc2(gelu(fc1(x)))), exact (erf) GELU,
  LayerNorm eps 1e-5; the fused `Wqkv` [3D, D] (with bias) holds q | k | v rows, each [heads, 64];
- rotary position embedding on q and k over the whole head (64), base 20000, positions 0..L-1, the
  non-interleaved form (dimension j pairs with j + 32);
- pooled = mean of the last hidden states over the attention mask (jina-clip-v2 has no text projection).

Keys (the ComfyUI repack layout, under "model."): embeddings.word_embeddings.weight [250002, 1024],
embeddings.token_type_embeddings.weight [1, 1024], emb_ln.{weight,bias}, encoder.layers.N.mixer.Wqkv
[3072, 1024] (+bias), mixer.out_proj, norm1, mlp.fc1 [4096, 1024], mlp.fc2, norm2.

`ops` supplies the Linear / LayerNorm / Embedding classes: torch.nn here and in tests, ComfyUI's
operations (manual cast, fp8, NF4) inside ComfyUI.

>>> cfg = JinaTextConfig(vocab_size=40, hidden_size=64, num_layers=1, num_heads=1, intermediate_size=32)
>>> hidden, pooled = JinaTextModel(cfg)(torch.tensor([[0, 5, 9, 2, 1]]), torch.tensor([[1, 1, 1, 1, 0]]))
>>> tuple(hidden.shape), tuple(pooled.shape)
((1, 5, 64), (1, 64))
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64  # Jina-XLM-RoBERTa: 1024 / 16 heads; a shape cannot tell heads apart, so it is fixed here
KEY_PREFIX = "model."
TORCH_OPS = SimpleNamespace(Linear=nn.Linear, LayerNorm=nn.LayerNorm, Embedding=nn.Embedding)
_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class JinaTextConfig:
    vocab_size: int = 250002
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    type_vocab_size: int = 1
    rope_base: float = 20000.0
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"JinaTextConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"JinaTextConfig: hidden_size {self.hidden_size} must split into {self.num_heads} "
                             "heads of even size (rotary pairs)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def config_from_state_dict(sd: Mapping, prefix: str = KEY_PREFIX) -> JinaTextConfig:
    """The architecture of a Jina text-tower state dict, read from its shapes (heads: hidden / 64).

    Raises ValueError naming the first key the tower needs that is absent.
    """
    def shape(key):
        if prefix + key not in sd:
            raise ValueError(f"not a Jina CLIP v2 text tower: key {prefix + key} is missing")
        return tuple(sd[prefix + key].shape)

    vocab, hidden = shape("embeddings.word_embeddings.weight")
    layers = {int(m.group(1)) for k in sd for m in [_LAYER_RE.match(k[len(prefix):])] if k.startswith(prefix) and m}
    if not layers or sorted(layers) != list(range(len(layers))):
        raise ValueError(f"not a Jina CLIP v2 text tower: encoder layers {sorted(layers)} are not 0..N-1")
    wqkv = shape("encoder.layers.0.mixer.Wqkv.weight")
    if wqkv != (3 * hidden, hidden):
        raise ValueError(f"Jina text tower: {prefix}encoder.layers.0.mixer.Wqkv.weight is {list(wqkv)}, "
                         f"expected [{3 * hidden}, {hidden}]")
    return JinaTextConfig(vocab_size=vocab, hidden_size=hidden, num_layers=len(layers),
                          num_heads=max(1, hidden // HEAD_DIM),
                          intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
                          type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0])


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim] in fp32: angle(pos, j) = pos / base^(2j/head_dim), repeated for both halves."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # [L, hd/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, hd]; rotates the pair (j, j + hd/2) by the angle of position l."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return x * cos + rotated * sin


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of hidden [B, L, D] over positions where mask [B, L] is 1 (all positions without a mask)."""
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class JinaEmbeddings(nn.Module):
    def __init__(self, cfg: JinaTextConfig, ops, device=None, dtype=None):
        super().__init__()
        self.word_embeddings = ops.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id,
                                             device=device, dtype=dtype)
        self.token_type_embeddings = ops.Embedding(cfg.type_vocab_size, cfg.hidden_size, device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
        x = self.word_embeddings(input_ids) if embeds is None else embeds
        # Every token has type 0: add row 0 of the type table, [1, 1, D].
        type_row = self.token_type_embeddings(torch.zeros((1, 1), dtype=torch.long, device=x.device))
        return x + type_row.to(x.dtype)


class JinaAttention(nn.Module):
    def __init__(self, cfg: JinaTextConfig, ops, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.head_dim, self.rope_base = cfg.num_heads, cfg.head_dim, cfg.rope_base
        self.Wqkv = ops.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True, device=device, dtype=dtype)
        self.out_proj = ops.Linear(cfg.hidden_size, cfg.hidden_size, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        b, L, _ = x.shape
        q, k, v = self.Wqkv(x).view(b, L, 3, self.num_heads, self.head_dim).unbind(2)  # each [B, L, H, hd]
        cos, sin = rotary_cos_sin(L, self.head_dim, self.rope_base, device=x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # keep [B, 1, 1, L] bool: True where a key may be attended (padding is False).
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep)
        return self.out_proj(out.transpose(1, 2).reshape(b, L, -1))


class JinaMLP(nn.Module):
    def __init__(self, cfg: JinaTextConfig, ops, device=None, dtype=None):
        super().__init__()
        self.fc1 = ops.Linear(cfg.hidden_size, cfg.intermediate_size, device=device, dtype=dtype)
        self.fc2 = ops.Linear(cfg.intermediate_size, cfg.hidden_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class JinaBlock(nn.Module):
    def __init__(self, cfg: JinaTextConfig, ops, device=None, dtype=None):
        super().__init__()
        self.mixer = JinaAttention(cfg, ops, device, dtype)
        self.norm1 = ops.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, device=device, dtype=dtype)
        self.mlp = JinaMLP(cfg, ops, device, dtype)
        self.norm2 = ops.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.mixer(x, keep))
        return self.norm2(x + self.mlp(x))


class JinaEncoder(nn.Module):
    def __init__(self, cfg: JinaTextConfig, ops, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(JinaBlock(cfg, ops, device, dtype) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, keep)
        return x


class JinaTextModel(nn.Module):
    """Token ids (or their embeddings) and a 0/1 attention mask -> (hidden [B, L, D], pooled [B, D])."""

    def __init__(self, cfg: JinaTextConfig = JinaTextConfig(), ops=TORCH_OPS, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        self.embeddings = JinaEmbeddings(cfg, ops, device, dtype)
        self.emb_ln = ops.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, device=device, dtype=dtype)
        self.encoder = JinaEncoder(cfg, ops, device, dtype)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids is None and embeds is None:
            raise ValueError("JinaTextModel needs input_ids or embeds")
        x = self.emb_ln(self.embeddings(input_ids, embeds))
        keep = None if attention_mask is None else attention_mask.to(device=x.device).bool()[:, None, None, :]
        hidden = self.encoder(x, keep)
        return hidden, mean_pool(hidden, None if attention_mask is None else attention_mask.to(hidden.device))
