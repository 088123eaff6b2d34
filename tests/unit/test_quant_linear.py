"""Fp8Linear and the Linear swap: state-dict form, loading any scale form, the keep filter."""

import pytest
import torch
from torch import nn

from quant import Fp8Linear, QuantConfig, dequantize, fp8_linear, quantize_linear_, quantize_weight

CFG = QuantConfig(compute="dequant")


def test_state_dict_has_fp8_weight_fp32_scale_and_high_precision_bias():
    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(nn.Linear(32, 16), CFG)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}
    assert sd["weight"].dtype == torch.float8_e4m3fn and sd["weight"].shape == (16, 32)
    assert sd["weight_scale"].dtype == torch.float32 and sd["weight_scale"].shape == (16,)
    assert sd["bias"].dtype == torch.float32
    assert not layer.weight.requires_grad


def test_forward_matches_source_linear_within_fp8_error():
    torch.manual_seed(0)
    src = nn.Linear(64, 32)
    layer = Fp8Linear.from_linear(src, CFG)
    x = torch.randn(4, 7, 64)
    with torch.no_grad():
        ref, out = src(x), layer(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 0.04


@pytest.mark.parametrize("scale_shape", [(), (1,), (16,), (16, 1)])
@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_load_state_dict_accepts_any_scale_form_and_fp8_dtype(scale_shape, fmt):
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    granularity = "per_tensor" if scale_shape in ((), (1,)) else "per_channel"
    q, s = quantize_weight(w, fmt, granularity)
    sd = {"weight": q, "weight_scale": s.reshape(scale_shape), "bias": torch.randn(16).to(torch.bfloat16)}
    layer = Fp8Linear(32, 16, compute="dequant")
    layer.load_state_dict(sd)
    assert layer.weight.dtype == q.dtype
    assert layer.weight_scale.shape == (() if granularity == "per_tensor" else (16,))
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), fp8_linear(x, q, s, sd["bias"].float(), mode="dequant"))


def test_load_state_dict_reports_bad_shapes_and_missing_keys():
    layer = Fp8Linear(32, 16)
    q, s = quantize_weight(torch.randn(8, 32))
    with pytest.raises(RuntimeError, match=r"weight: expected fp8 \[16, 32\]"):
        layer.load_state_dict({"weight": q, "weight_scale": s, "bias": torch.zeros(16)})
    q, _ = quantize_weight(torch.randn(16, 32))
    with pytest.raises(RuntimeError, match="does not fit 16 output channels"):
        layer.load_state_dict({"weight": q, "weight_scale": torch.ones(3), "bias": torch.zeros(16)})
    with pytest.raises(RuntimeError, match="weight_scale"):
        Fp8Linear(32, 16).load_state_dict({"weight": q, "bias": torch.zeros(16)})
    with pytest.raises(RuntimeError, match="Unexpected key.*bias"):
        Fp8Linear(32, 16, bias=False).load_state_dict({"weight": q, "weight_scale": torch.ones(16), "bias": torch.zeros(16)})


def test_load_into_a_model_by_prefix():
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    quantize_linear_(model, CFG)
    fresh = nn.Sequential(Fp8Linear(32, 16, compute="dequant"), nn.ReLU(), Fp8Linear(16, 8, compute="dequant"))
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 32)
    torch.testing.assert_close(fresh(x), model(x))


def test_quantize_linear_swaps_by_filter_and_filter_sees_key_and_shape():
    model = nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(32, 32), nn.Linear(32, 64)]), "final": nn.Linear(32, 4)})
    seen = []

    def keep(key, shape):
        seen.append((key, shape))
        return key.startswith("final.")

    swapped = quantize_linear_(model, CFG, keep)
    assert swapped == ["blocks.0", "blocks.1"]
    assert ("blocks.1.weight", (64, 32)) in seen
    assert isinstance(model["blocks"][0], Fp8Linear) and type(model["final"]) is nn.Linear


def test_per_tensor_and_none_configs_give_scalar_scales():
    for granularity in ("per_tensor", "none"):
        layer = Fp8Linear.from_linear(nn.Linear(32, 16), QuantConfig(granularity=granularity))
        assert layer.weight_scale.shape == ()
        assert "per_tensor" in repr(layer)
    layer = Fp8Linear.from_linear(nn.Linear(32, 16), QuantConfig(granularity="none"))
    torch.testing.assert_close(dequantize(layer.weight, layer.weight_scale), layer.weight.float())


def test_bad_compute_mode_is_refused():
    with pytest.raises(ValueError, match="compute='fast'"):
        Fp8Linear(32, 16, compute="fast")
