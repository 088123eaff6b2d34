"""Streaming reader: every input layout normalised to {weight fp8, weight_scale fp32}, prefixes, the
keep filter, and the errors for bad files (each naming the file and the layer)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import quant.stream as stream
from quant import (
    CorruptFileError, MissingScaleError, NonFiniteWeightError, QuantConfig, QuantFileError, SavedFormatVersionError,
    UnsupportedQuantFormatError, dequantize, iter_quantized, quantize_file, quantize_linear_, quantize_weight,
    save_quantized,
)
from quant.saved_format import VERSION_KEY

E4M3 = torch.float8_e4m3fn
CFG = QuantConfig()
LAYERS = {"blocks.0.qkv": (64, 32), "blocks.0.proj": (32, 32), "final": (16, 32)}


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16) for name, shape in LAYERS.items()}


def _extras():
    return {"blocks.0.norm.scale": torch.ones(32), "blocks.0.qkv.bias": torch.zeros(64, dtype=torch.bfloat16)}


def _write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def _assert_normalised(sd, originals, tol):
    for layer, w in originals.items():
        q, s = sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"]
        assert q.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and s.dtype == torch.float32
        assert s.shape in ((), (w.shape[0],))
        err = (dequantize(q, s) - w.float()).norm() / w.float().norm()
        assert err.item() < tol, (layer, err.item())


# ---------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------

def test_high_precision_file_is_quantized_per_channel(tmp_path):
    w = _weights()
    path = _write(tmp_path / "bf16.safetensors", {f"{k}.weight": v for k, v in w.items()} | _extras())
    res = quantize_file(path, CFG)
    assert res.layout == "high_precision" and len(res.quantized) == 3 and res.fp8_source == ()
    _assert_normalised(res.state_dict, w, tol=0.04)
    assert res.state_dict["blocks.0.qkv.weight_scale"].shape == (64,)
    assert res.state_dict["blocks.0.norm.scale"].dtype == torch.float32  # passed on as stored
    assert set(res.state_dict) == {f"{k}.{s}" for k in w for s in ("weight", "weight_scale")} | set(_extras())


def test_progress_counts_every_tensor_and_an_exception_in_it_stops_the_load(tmp_path):
    """The loader's progress bar and cancel button: progress(done, total) after each tensor of the file
    (scales are not tensors of the file); what it raises (ComfyUI's interrupt) propagates out of the load."""
    w = _weights()
    path = _write(tmp_path / "bf16.safetensors", {f"{k}.weight": v for k, v in w.items()} | _extras())
    seen = []
    quantize_file(path, CFG, progress=lambda done, total: seen.append((done, total)))
    total = len(w) + len(_extras())
    assert seen == [(i, total) for i in range(1, total + 1)]

    class Cancelled(Exception):
        pass

    def cancel_at_two(done, total):
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        quantize_file(path, CFG, progress=cancel_at_two)


def test_iter_quantized_is_lazy_and_yields_the_same_state_dict(tmp_path):
    w = _weights()
    path = _write(tmp_path / "bf16.safetensors", {f"{k}.weight": v for k, v in w.items()} | _extras())
    it = iter_quantized(path, CFG)
    first_key, first = next(it)  # one tensor produced before the rest is read
    rest = dict(it)
    whole = quantize_file(path, CFG).state_dict
    assert set(whole) == {first_key} | set(rest)
    assert all(torch.equal(whole[k].view(torch.uint8), v.view(torch.uint8)) if v.dtype == E4M3
               else torch.equal(whole[k], v) for k, v in rest.items())


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor", "none"])
def test_streamed_row_blocks_equal_whole_tensor_quantization(tmp_path, monkeypatch, granularity):
    monkeypatch.setattr(stream, "BLOCK_ELEMS", 100)  # 3 rows of 32 per block: many blocks
    w = _weights()
    path = _write(tmp_path / "bf16.safetensors", {f"{k}.weight": v for k, v in w.items()})
    sd = quantize_file(path, QuantConfig(granularity=granularity)).state_dict
    for layer, weight in w.items():
        q, s = quantize_weight(weight, "e4m3fn", granularity)
        assert torch.equal(sd[f"{layer}.weight"].view(torch.uint8), q.view(torch.uint8))
        torch.testing.assert_close(sd[f"{layer}.weight_scale"], s)


def test_plain_fp8_file_gets_scale_one(tmp_path):
    w = _weights()
    path = _write(tmp_path / "plain.safetensors", {f"{k}.weight": v.to(E4M3) for k, v in w.items()} | _extras())
    res = quantize_file(path, CFG)
    assert res.layout == "plain_fp8" and len(res.fp8_source) == 3 and res.quantized == ()
    for layer in w:
        assert res.state_dict[f"{layer}.weight_scale"].shape == ()
        assert res.state_dict[f"{layer}.weight_scale"].item() == 1.0
    _assert_normalised(res.state_dict, w, tol=0.2)  # unscaled small weights lose much; the bytes are kept


def _scaled_fp8_tensors(w, marker_dtype=E4M3):
    t = {"scaled_fp8": torch.empty(0, dtype=marker_dtype)}
    for layer, weight in w.items():
        q, s = quantize_weight(weight, "e4m3fn", "per_tensor")
        t |= {f"{layer}.weight": q, f"{layer}.scale_weight": s, f"{layer}.scale_input": torch.tensor(1.0)}
    return t | _extras()


def test_scaled_fp8_file_keeps_bytes_and_scalar_scales(tmp_path):
    w = _weights()
    tensors = _scaled_fp8_tensors(w)
    path = _write(tmp_path / "scaled.safetensors", tensors)
    res = quantize_file(path, CFG)
    assert res.layout == "scaled_fp8" and len(res.fp8_source) == 3
    sd = res.state_dict
    assert not any(k.endswith(("scale_weight", "scale_input")) or k == "scaled_fp8" for k in sd)
    for layer in w:
        assert torch.equal(sd[f"{layer}.weight"].view(torch.uint8), tensors[f"{layer}.weight"].view(torch.uint8))
        assert sd[f"{layer}.weight_scale"] == tensors[f"{layer}.scale_weight"]
    _assert_normalised(sd, w, tol=0.06)


def test_scaled_fp8_missing_scale_names_the_layer(tmp_path):
    tensors = _scaled_fp8_tensors(_weights())
    del tensors["blocks.0.proj.scale_weight"]
    path = _write(tmp_path / "scaled.safetensors", tensors)
    with pytest.raises(MissingScaleError, match=r"blocks\.0\.proj has an fp8 weight but no blocks\.0\.proj\.scale_weight"):
        quantize_file(path, CFG)


def _comfy_quant(fmt="float8_e4m3fn"):
    return torch.tensor(list(json.dumps({"format": fmt}).encode("utf-8")), dtype=torch.uint8)


@pytest.mark.parametrize("declare", ["comfy_quant", "metadata", "uint8_storage"])
def test_weight_scale_layout(tmp_path, declare):
    w = _weights()
    t, layers = dict(_extras()), {}
    for i, (layer, weight) in enumerate(w.items()):
        if layer == "final":  # the file's author left it in bf16
            t[f"{layer}.weight"] = weight
            continue
        q, s = quantize_weight(weight, "e4m3fn", "per_tensor")
        t[f"{layer}.weight"] = q.view(torch.uint8) if declare == "uint8_storage" else q
        t[f"{layer}.weight_scale"] = s
        t[f"{layer}.input_scale"] = torch.tensor(0.5)
        if declare in ("comfy_quant", "uint8_storage"):
            t[f"{layer}.comfy_quant"] = _comfy_quant()
        layers[layer] = "float8_e4m3fn" if i == 0 else {"format": "float8_e4m3fn"}
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    path = _write(tmp_path / "ws.safetensors", t, meta if declare == "metadata" else None)
    res = quantize_file(path, CFG)
    assert res.layout == "weight_scale" and len(res.fp8_source) == 2 and res.kept == ("final.weight",)
    sd = res.state_dict
    assert not any(k.endswith((".input_scale", ".comfy_quant")) for k in sd)
    assert sd["final.weight"].dtype == torch.bfloat16 and "final.weight_scale" not in sd
    _assert_normalised(sd, {k: v for k, v in w.items() if k != "final"}, tol=0.06)


def test_weight_scale_declared_layer_without_scale_is_an_error(tmp_path):
    q, _ = quantize_weight(_weights()["final"])
    path = _write(tmp_path / "ws.safetensors", {"final.weight": q, "final.comfy_quant": _comfy_quant(),
                                               "other.weight_scale": torch.tensor(1.0)})
    with pytest.raises(MissingScaleError, match=r"final has an fp8 weight but no final\.weight_scale"):
        quantize_file(path, CFG)


def test_weight_scale_file_with_another_format_is_refused(tmp_path):
    path = _write(tmp_path / "nvfp4.safetensors", {"final.weight": torch.zeros(16, 16, dtype=torch.uint8),
                                                  "final.weight_scale": torch.tensor(1.0),
                                                  "final.comfy_quant": _comfy_quant("nvfp4")})
    with pytest.raises(UnsupportedQuantFormatError, match="layer final is quantized as 'nvfp4'"):
        quantize_file(path, CFG)


def test_own_format_round_trip_and_version_check(tmp_path):
    w = _weights()
    src = _write(tmp_path / "bf16.safetensors", {f"{k}.weight": v for k, v in w.items()} | _extras())
    first = quantize_file(src, QuantConfig(granularity="per_tensor"))
    own = str(tmp_path / "own.safetensors")
    save_quantized(first.state_dict, own, QuantConfig(granularity="per_tensor"), source="bf16.safetensors")
    again = quantize_file(own, CFG)  # the file's own config wins: fp8 bytes are never re-quantized
    assert again.layout == "lowvram" and again.file_config == QuantConfig(granularity="per_tensor")
    assert set(again.state_dict) == set(first.state_dict)
    for k, v in first.state_dict.items():
        assert torch.equal(again.state_dict[k].view(torch.uint8) if v.dtype == E4M3 else again.state_dict[k],
                           v.view(torch.uint8) if v.dtype == E4M3 else v)
    sd = dict(again.state_dict)
    _write(tmp_path / "v9.safetensors", sd, {"lowvram.format": "fp8-scaled", VERSION_KEY: "9", "lowvram.config": "{}"})
    with pytest.raises(SavedFormatVersionError, match="version '9'.*re-create it from the original"):
        quantize_file(str(tmp_path / "v9.safetensors"), CFG)


def test_own_files_fp8_weights_are_not_read_again_but_other_fp8_files_are(tmp_path):
    """Our files were checked before saving; reading their 12 GB again would make a reload slower than
    ComfyUI's. The same bytes in a plain fp8 file are checked, and our scales still are."""
    q, s = quantize_weight(_weights()["final"], "e4m3fn", "per_channel")
    q.view(torch.uint8)[3, 4] = 0x7F  # e4m3fn NaN
    own = str(tmp_path / "own.safetensors")
    save_quantized({"final.weight": q, "final.weight_scale": s}, own, CFG, source="x")
    res = quantize_file(own, CFG)
    assert res.fp8_source == ("final.weight",) and res.state_dict["final.weight"].view(torch.uint8)[3, 4] == 0x7F
    with pytest.raises(NonFiniteWeightError, match=r"final\.weight contains NaN or inf values \(first in row 3\)"):
        quantize_file(_write(tmp_path / "plain.safetensors", {"final.weight": q}), CFG)
    s[2] = float("inf")
    save_quantized({"final.weight": q, "final.weight_scale": s}, own, CFG, source="x")
    with pytest.raises(NonFiniteWeightError, match=r"final\.weight_scale"):
        quantize_file(own, CFG)


def test_prefix_reads_only_the_diffusion_model_of_an_all_in_one_checkpoint(tmp_path):
    w = _weights()
    t = {f"model.diffusion_model.{k}.weight": v.to(E4M3) for k, v in w.items()}
    t["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=E4M3)
    t |= {f"model.diffusion_model.{k}.scale_weight": torch.tensor(1.0) for k in w}
    t["vae.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    t["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(8, 4, dtype=torch.float8_e4m3fn)
    path = _write(tmp_path / "aio.safetensors", t)
    res = quantize_file(path, CFG, prefix="model.diffusion_model.")
    assert res.layout == "scaled_fp8"
    assert set(res.state_dict) == {f"{k}.{s}" for k in w for s in ("weight", "weight_scale")}
    with pytest.raises(QuantFileError, match="no tensors under the prefix 'unet.'"):
        quantize_file(path, CFG, prefix="unet.")


def test_keep_filter_keeps_layers_in_high_precision(tmp_path):
    w = _weights()
    seen = []

    def keep(key, shape):
        seen.append((key, shape))
        return key == "final.weight"

    bf16 = _write(tmp_path / "bf16.safetensors", {f"{k}.weight": v for k, v in w.items()})
    res = quantize_file(bf16, CFG, keep)
    assert res.kept == ("final.weight",) and torch.equal(res.state_dict["final.weight"], w["final"])
    assert ("blocks.0.qkv.weight", (64, 32)) in seen
    scaled = _write(tmp_path / "scaled.safetensors", _scaled_fp8_tensors(w))
    res = quantize_file(scaled, CFG, keep)  # fp8 source: the kept layer is dequantized to bf16
    assert res.state_dict["final.weight"].dtype == torch.bfloat16 and "final.weight_scale" not in res.state_dict


def test_result_loads_into_fp8_linear_modules(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).to(torch.bfloat16)
    path = _write(tmp_path / "m.safetensors", model.state_dict())
    target = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    quantize_linear_(target, QuantConfig(compute="dequant"))
    target.load_state_dict(quantize_file(path, CFG).state_dict)
    x = torch.randn(4, 32).to(torch.bfloat16)
    ref, out = model(x).float(), target(x).float()
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


# ---------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["bf16", "fp8"])
def test_nan_or_inf_names_the_tensor_and_row(tmp_path, where):
    w = _weights()
    bad = w["blocks.0.proj"].clone()
    bad[5, 3] = float("nan") if where == "bf16" else float("inf")
    w["blocks.0.proj"] = bad
    t = {f"{k}.weight": (v if where == "bf16" else v.float().clamp(-1, 1).to(E4M3)) for k, v in w.items()}
    if where == "fp8":
        t["blocks.0.proj.weight"] = torch.where(torch.isfinite(bad), bad, torch.nan).float().to(E4M3)
    path = _write(tmp_path / "nan.safetensors", t)
    with pytest.raises(NonFiniteWeightError, match=r"blocks\.0\.proj\.weight contains NaN or inf values \(first in row 5\)"):
        quantize_file(path, CFG)


@pytest.mark.parametrize("dtype,bad_values", [
    (torch.float8_e4m3fn, [float("nan"), -float("nan")]),
    (torch.float8_e5m2, [float("inf"), -float("inf"), float("nan")]),
    (torch.bfloat16, [float("inf"), -float("inf"), float("nan")]),
])
def test_finite_check_finds_every_non_finite_pattern_and_only_those(monkeypatch, dtype, bad_values):
    monkeypatch.setattr(stream, "BLOCK_ELEMS", 64)  # several row blocks of 8 rows
    # Every finite value of the format, the largest magnitudes included, passes.
    finite = torch.arange(256, dtype=torch.uint8).view(dtype) if dtype != torch.bfloat16 else torch.randn(256).bfloat16()
    finite = finite[torch.isfinite(finite.float())].reshape(-1, 2)
    stream._check_finite(finite, "w", "f.safetensors")
    for v in bad_values:
        t = finite.clone()
        t[13, 1] = torch.tensor(v).to(dtype)
        with pytest.raises(NonFiniteWeightError, match=r"f\.safetensors: tensor w contains NaN or inf values \(first in row 13\)"):
            stream._check_finite(t, "w", "f.safetensors")


def test_nan_in_a_passed_on_tensor_is_named_too(tmp_path):
    path = _write(tmp_path / "nan.safetensors", {"final.weight": _weights()["final"],
                                                "blocks.0.norm.scale": torch.tensor([1.0, float("inf")])})
    with pytest.raises(NonFiniteWeightError, match=r"blocks\.0\.norm\.scale"):
        quantize_file(path, CFG)


def test_truncated_file_names_the_file(tmp_path):
    path = _write(tmp_path / "trunc.safetensors", {f"{k}.weight": v for k, v in _weights().items()})
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) - 100])
    with pytest.raises(CorruptFileError, match="trunc.safetensors cannot be read.*truncated or corrupt"):
        quantize_file(path, CFG)


@pytest.mark.parametrize("content", [b"", b"\x00" * 4, b"not a safetensors file at all, just text"])
def test_garbage_file_names_the_file(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptFileError, match="junk.safetensors"):
        quantize_file(str(path), CFG)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        quantize_file(str(tmp_path / "nope.safetensors"), CFG)
