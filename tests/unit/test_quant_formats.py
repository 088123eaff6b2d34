"""The format table, QuantConfig validation, and the docstring examples of every quant module."""

import doctest
import importlib

import pytest
import torch

from quant import FP8_FORMATS, QuantConfig, fp8_format, quantize_weight, dequantize

MODULES = ["quant.formats", "quant.scales", "quant.matmul", "quant.linear"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


def test_format_table_facts():
    assert FP8_FORMATS["e4m3fn"].max_finite == 448.0 == torch.finfo(torch.float8_e4m3fn).max
    assert FP8_FORMATS["e5m2"].max_finite == 57344.0 == torch.finfo(torch.float8_e5m2).max
    assert fp8_format("e5m2").dtype == torch.float8_e5m2
    with pytest.raises(ValueError, match="e4m3fn, e5m2"):
        fp8_format("e3m4")


@pytest.mark.parametrize("field,value", [("fmt", "fp8"), ("granularity", "per_row"), ("compute", "fast"),
                                         ("act_scaling", "per_channel")])
def test_config_errors_name_the_field_and_the_allowed_values(field, value):
    with pytest.raises(ValueError, match=f"QuantConfig.{field}='{value}' is not allowed; choose one of"):
        QuantConfig(**{field: value})


def test_config_json_round_trip_and_bad_json():
    cfg = QuantConfig(fmt="e5m2", granularity="per_tensor", compute="dequant", act_scaling="per_tensor")
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        QuantConfig.from_json('{"fmt": "e4m3fn", "bits": 8}', source="x.safetensors")
    with pytest.raises(ValueError, match="not valid JSON"):
        QuantConfig.from_json("{", source="x.safetensors")


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor", "none"])
def test_round_trip_never_overflows_and_fp8_values_survive_exactly(fmt, granularity):
    f = fp8_format(fmt)
    w = torch.randn(8, 32) * 1000  # far above e4m3's 448: must clamp, never NaN
    w[3] = 0.0  # an all-zero row: scale guard
    q, s = quantize_weight(w, fmt, granularity)
    assert q.dtype == f.dtype and s.dtype == torch.float32
    d = dequantize(q, s)
    assert torch.isfinite(d).all() and (d[3] == 0).all()
    # Quantizing an already dequantized tensor again gives the same bytes (values are on the grid).
    if granularity != "none":
        q2, _ = quantize_weight(d, fmt, granularity)
        assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


def test_quantize_does_not_modify_its_input():
    w = torch.randn(4, 16)
    before = w.clone()
    quantize_weight(w)
    assert torch.equal(w, before)
