"""Fidelity of fp8 weights: SQNR per layer, and a toy DiT whose output error orders the schemes."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant import QuantConfig, dequantize, quantize_linear_, quantize_weight, sqnr_db


def outlier_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A bf16 weight shaped like trained transformer weights at their worst for fp8:
    heavy-tailed values (Student t, 4 dof), row magnitudes spread log-normally (sigma 1.5, so rows
    differ by ~100x), and 4 input columns 30x larger (outlier features)."""
    g = torch.Generator().manual_seed(seed)
    # Student t with 4 dof: a normal over sqrt(chi2_4 / 4), chi2_4 a sum of 4 squared normals.
    chi2 = torch.randn(4, out_features, in_features, generator=g).pow(2).mean(dim=0)
    w = torch.randn(out_features, in_features, generator=g) / chi2.sqrt() / math.sqrt(in_features)
    w *= torch.exp(torch.randn(out_features, generator=g) * 1.5)[:, None]
    cols = torch.randperm(in_features, generator=g)[:4]
    w[:, cols] *= 30.0
    return w.to(torch.bfloat16)


def _row_sqnrs(ref: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    return torch.tensor([sqnr_db(ref[i], approx[i]) for i in range(ref.shape[0])])


@pytest.mark.parametrize("shape,seed", [((512, 1024), 0), ((1024, 512), 1), ((384, 1536), 2)])
def test_e4m3_per_channel_sqnr_at_least_30db_and_per_tensor_clearly_worse(shape, seed):
    w = outlier_weight(*shape, seed=seed).float()
    results = {}
    for granularity in ("per_channel", "per_tensor"):
        q, s = quantize_weight(w, "e4m3fn", granularity)
        d = dequantize(q, s)
        rows = _row_sqnrs(w, d)
        results[granularity] = {"layer": sqnr_db(w, d), "median_row": rows.median().item(),
                                "worst_row": rows.min().item(), "rows_below_25db": (rows < 25).float().mean().item()}
    pc, pt = results["per_channel"], results["per_tensor"]
    assert pc["layer"] >= 30.0, results
    assert pc["worst_row"] >= 28.0 and pc["rows_below_25db"] == 0.0, results
    # Per-layer SQNR is energy-weighted, so large rows hide what per-tensor scaling does to small
    # rows: they sink into e4m3 subnormals. Row-wise numbers show it.
    assert pt["median_row"] <= pc["median_row"] - 1.5, results
    assert pt["worst_row"] <= pc["worst_row"] - 10.0, results
    assert pt["rows_below_25db"] > 0.0, results


def test_e5m2_is_coarser_than_e4m3_on_the_same_weight():
    w = outlier_weight(256, 512, seed=3).float()
    sq = {fmt: sqnr_db(w, dequantize(*quantize_weight(w, fmt, "per_channel"))) for fmt in ("e4m3fn", "e5m2")}
    assert sq["e5m2"] < sq["e4m3fn"] - 4.0, sq  # one mantissa bit less is ~6 dB


# ----------------------------------------------------------------------------------------------
# Toy DiT: adaLN modulation, attention and MLP, 4 blocks. Mirrors the acceptance criterion
# "fp8 per-channel output closer to the bf16 model than a plain fp8 cast and a per-tensor cast".
# ----------------------------------------------------------------------------------------------

class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.mod = nn.Linear(dim, 6 * dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp_in = nn.Linear(dim, 4 * dim)
        self.mlp_out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # x [B, T, D], c [B, D]
        b, t, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.mod(F.silu(c))[:, None].chunk(6, dim=-1)
        h = F.layer_norm(x, (d,)) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = F.rms_norm(q, (d // self.heads,)), F.rms_norm(k, (d // self.heads,))  # qk-norm as in Flux
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + gate1 * self.proj(a)
        h = F.layer_norm(x, (d,)) * (1 + scale2) + shift2
        return x + gate2 * self.mlp_out(F.gelu(self.mlp_in(h)))


class ToyDiT(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 4, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(dim, heads) for _ in range(depth))
        self.final = nn.Linear(dim, 16)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, c)
        return self.final(F.layer_norm(x, (x.shape[-1],)))


def _toy_model(seed: int = 0) -> ToyDiT:
    torch.manual_seed(seed)
    model = ToyDiT()
    with torch.no_grad():
        for i, m in enumerate(model.modules()):
            if isinstance(m, nn.Linear):
                # The "bf16 file": outlier-heavy weights rounded to bf16, computed in fp32 below.
                m.weight.copy_(outlier_weight(*m.weight.shape, seed=100 + i).float())
                m.bias.normal_(0, 0.02)
    return model


def _rel_l2(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_toy_dit_per_channel_beats_per_tensor_and_plain_cast():
    torch.manual_seed(1)
    x, c = torch.randn(2, 64, 128), torch.randn(2, 128)
    reference = _toy_model()
    with torch.no_grad():
        ref = reference(x, c)
    errors = {}
    for granularity in ("per_channel", "per_tensor", "none"):
        model = copy.deepcopy(reference)
        swapped = quantize_linear_(model, QuantConfig(granularity=granularity, compute="dequant"))
        assert len(swapped) == 4 * 5 + 1
        with torch.no_grad():
            errors[granularity] = _rel_l2(ref, model(x, c))
    assert errors["per_channel"] < 0.06, errors
    assert errors["per_channel"] < 0.8 * errors["per_tensor"], errors
    assert errors["per_tensor"] < errors["none"], errors
