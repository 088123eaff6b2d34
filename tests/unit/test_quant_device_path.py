"""Quantizing on a device while the file streams (quant.device_quant): the same bytes, scales, keys and
key order as the host path, errors that name the tensor, and the staging-buffer rules. The pipeline runs
on the CPU here; on a CUDA machine the last test runs it there too."""

import pytest
import torch
from safetensors.torch import save_file

import quant.stream as stream
from quant import NonFiniteWeightError, QuantConfig, iter_quantized, quantize_file
from quant.device_quant import DeviceQuantizer

E4M3 = torch.float8_e4m3fn
# Sizes differ so the staging buffers are reused for smaller and larger weights; biases and norms sit
# between the weights (passed on) as in real files, and one layer is kept in bf16.
LAYERS = {"a.qkv": (96, 32), "a.proj": (32, 32), "b.mlp.0": (128, 32), "b.mlp.2": (32, 128), "final": (16, 32)}


def _file(tmp_path, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i, (layer, shape) in enumerate(LAYERS.items()):
        # Rows of very different magnitude, so per-channel and per-tensor scales differ.
        w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0])[:, None]
        t[f"{layer}.weight"] = w.to(dtype)
        t[f"{layer}.bias"] = torch.randn(shape[0], generator=g).to(dtype)
        t[f"norm{i}.scale"] = torch.ones(shape[1])
    path = tmp_path / "model.safetensors"
    save_file(t, str(path))
    return str(path)


def _keep_final(name, _shape):
    return name.startswith("final.")


def _run(path, cfg, device_path, device="cpu"):
    r = stream._Reader(path, "")
    return [(k, v, a) for k, v, a in stream._iter_with_actions(r, cfg, _keep_final, device, device_path)]


def _same(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor", "none"])
def test_device_path_gives_the_host_paths_bytes_keys_and_order(tmp_path, monkeypatch, fmt, granularity):
    monkeypatch.setattr(stream, "BLOCK_ELEMS", 1000)  # the host path works in many row blocks
    path = _file(tmp_path)
    cfg = QuantConfig(fmt=fmt, granularity=granularity)
    host, device = _run(path, cfg, False), _run(path, cfg, True)
    assert [(k, a) for k, _, a in host] == [(k, a) for k, _, a in device]
    assert [a for _, _, a in device].count("quantized") == 4 and ("final.weight", "kept") in [(k, a) for k, _, a in device]
    for (k, h, _), (_, d, _) in zip(host, device):
        assert _same(h, d), k


def test_fp32_and_fp16_sources_too(tmp_path):
    for dtype in (torch.float32, torch.float16):
        path = _file(tmp_path, dtype=dtype)
        host, device = _run(path, QuantConfig(), False), _run(path, QuantConfig(), True)
        assert all(_same(h, d) for (_, h, _), (_, d, _) in zip(host, device))


def test_public_functions_take_the_device(tmp_path):
    path = _file(tmp_path)
    res = quantize_file(path, QuantConfig(), _keep_final, device="cpu")
    streamed = dict(iter_quantized(path, QuantConfig(), _keep_final, device=torch.device("cpu")))
    assert list(res.state_dict) == list(streamed) and len(res.quantized) == 4 and res.kept == ("final.weight",)


def test_nan_found_on_the_device_names_the_tensor_and_row(tmp_path):
    w = torch.randn(40, 32)
    w[17, 3] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file({"a.weight": torch.randn(8, 32).bfloat16(), "b.weight": w.bfloat16(), "c.weight": torch.randn(8, 32)},
              str(path))
    with pytest.raises(NonFiniteWeightError, match=r"b\.weight contains NaN or inf values \(first in row 17\)"):
        _run(str(path), QuantConfig(), True)


def test_cuda_without_cuda_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available; pass device='cpu'"):
        DeviceQuantizer("cuda", 64, 32)


def test_staging_buffers_are_sized_to_the_largest_weight(tmp_path):
    path = _file(tmp_path)
    dq = stream._device_quantizer(stream._Reader(path, ""), QuantConfig(), _keep_final, torch.device("cpu"))
    largest = max(r * c for layer, (r, c) in LAYERS.items() if layer != "final")
    assert dq._staging_in.numel() == largest * 2 and [b.numel() for b in dq._staging_out] == [largest] * 2
    with pytest.raises(ValueError, match="too_big: .* exceed the staging buffer"):
        dq.submit("too_big", torch.zeros(largest + 1, 1, dtype=torch.bfloat16), QuantConfig())
    dq.close()


@pytest.mark.parametrize("in_thread", [True, False])
def test_copy_out_on_a_helper_thread_or_inline_gives_the_same_state_dict(tmp_path, monkeypatch, in_thread):
    import quant.device_quant as device_quant

    path = _file(tmp_path)
    monkeypatch.setattr(device_quant, "COPY_OUT_IN_THREAD", in_thread)
    host, device = _run(path, QuantConfig(), False), _run(path, QuantConfig(), True)
    assert [k for k, _, _ in host] == [k for k, _, _ in device]
    assert all(_same(h, d) for (_, h, _), (_, d, _) in zip(host, device))


def test_a_file_with_nothing_to_quantize_needs_no_quantizer(tmp_path):
    path = tmp_path / "fp8.safetensors"
    save_file({"a.weight": torch.randn(8, 32).to(E4M3), "a.bias": torch.zeros(8)}, str(path))
    r = stream._Reader(str(path), "")
    assert stream._device_quantizer(r, QuantConfig(), _keep_final, torch.device("cpu")) is None
    assert [a for _, _, a in _run(str(path), QuantConfig(), True)] == ["passed", "fp8_source", "scale"]


def test_docstring_example():
    import doctest

    import quant.device_quant
    assert doctest.testmod(quant.device_quant).failed == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_cuda_path_gives_the_cpu_bytes(tmp_path, granularity):
    path = _file(tmp_path)
    cfg = QuantConfig(granularity=granularity)
    host, cuda = _run(path, cfg, False), _run(path, cfg, None, "cuda")
    assert all(v.device.type == "cpu" for _, v, _ in cuda)
    assert all(_same(h, d) for (_, h, _), (_, d, _) in zip(host, cuda))
