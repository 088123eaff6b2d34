"""fp8_linear: the dequant path against float64, the `torch._scaled_mm` arguments against the rules
torch enforces on CUDA (a strict stand-in checks them on the CPU), shape fallbacks, and the mode choice."""

import logging
import subprocess
import sys

import pytest
import torch

import quant.matmul as mm
from harness.strict_scaled_mm import StrictScaledMM
from quant import dequantize, fp8_linear, quantize_weight, resolve_compute

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _weight(n=48, k=64, granularity="per_channel", fmt="e4m3fn", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.01, 1.0, n)[:, None]
    return quantize_weight(w, fmt, granularity)


def _reference(x, q, s, bias=None):
    """float64 x @ dequant(w).T + bias."""
    y = x.double() @ dequantize(q, s, torch.float64).T
    return y + bias.double() if bias is not None else y


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------
# dequant path
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor", "none"])
def test_dequant_matches_float64_within_bf16_tolerance(granularity):
    q, s = _weight(granularity=granularity)
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    bias = torch.randn(48).to(torch.bfloat16)
    y = fp8_linear(x, q, s, bias, mode="dequant")
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 48)
    ref = _reference(x, q, s, bias)
    # bf16 keeps 8 significant bits: the product, the bf16 weight and the sum each round at ~2**-9.
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert _rel(y, ref) < 1e-2


def test_dequant_in_fp32_is_exact_to_fp32_rounding():
    q, s = _weight()
    x = torch.randn(7, 64)
    y = fp8_linear(x, q, s, None, mode="dequant")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(x, q, s), rtol=1e-5, atol=1e-5)


def test_unknown_mode_is_refused_with_the_allowed_values():
    q, s = _weight()
    with pytest.raises(ValueError, match="fp8, dequant"):
        fp8_linear(torch.randn(2, 64), q, s, mode="int8")


# ---------------------------------------------------------------------------------------------
# fp8 path: a stand-in for torch._scaled_mm that enforces the CUDA rules (ATen ScaledBlas.cpp)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def strict_mm(monkeypatch):
    fake = StrictScaledMM()
    monkeypatch.setattr(torch, "_scaled_mm", fake)
    # These CPU tensors stand for CUDA ones: the real rule sends a CPU input to dequant (tested below).
    monkeypatch.setattr(mm, "fp8_matmul_supported", lambda device: True)
    return fake


def test_an_input_on_a_device_without_fp8_gemm_is_dequantized(monkeypatch):
    # ComfyUI runs a text encoder it cannot fit on the CPU; torch's CPU _scaled_mm refuses row-wise scales.
    def refuse(*a, **k):
        raise AssertionError("_scaled_mm must not be called for a CPU input")
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    q, s = _weight(granularity="per_channel")
    x = torch.randn(3, q.shape[1])
    assert mm.scaled_mm_unsupported_reason(x, q, s, "per_token") == "input on cpu, which has no fp8 GEMM"
    assert torch.equal(mm.linear_fp8(x, q, s, None, torch.float32), fp8_linear(x, q, s, out_dtype=torch.float32))


@pytest.mark.parametrize("act_scaling", ["per_token", "per_tensor"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("lead_shape", [(1,), (4, 9)])
def test_fp8_path_builds_valid_scaled_mm_arguments(strict_mm, act_scaling, granularity, lead_shape):
    q, s = _weight(granularity=granularity)
    x = torch.randn(*lead_shape, 64).to(torch.bfloat16)
    bias = torch.randn(48).to(torch.bfloat16)
    y = fp8_linear(x, q, s, bias, mode="fp8", act_scaling=act_scaling)
    assert len(strict_mm.calls) == 1
    call = strict_mm.calls[0]
    m = 1 if lead_shape == (1,) else 36
    assert (call["m"], call["k"], call["n"]) == (m, 64, 48)
    assert call["tensorwise"] == (granularity == "per_tensor" and act_scaling == "per_tensor")
    assert y.shape == (*lead_shape, 48) and y.dtype == torch.bfloat16
    # Only the activation's e4m3 rounding separates it from the exact product (~2**-4 per value).
    assert _rel(y, _reference(x, q, s, bias)) < 0.05


def test_fp8_path_fp32_output_adds_bias_after_the_gemm(strict_mm):
    # torch refuses a bias with fp32 output, so a tensor-wise fp32 GEMM gets none and the bias is added after.
    q, s = _weight(granularity="per_tensor")
    x, bias = torch.randn(5, 64), torch.randn(48)
    y = fp8_linear(x, q, s, bias, out_dtype=torch.float32, mode="fp8", act_scaling="per_tensor")
    call = strict_mm.calls[0]
    assert call["tensorwise"] and call["out_dtype"] == torch.float32 and not call["bias"]
    assert y.dtype == torch.float32
    assert _rel(y, _reference(x, q, s, bias)) < 0.05


@pytest.mark.parametrize("n,k", [(48, 72), (50, 64), (8, 64)])
def test_shapes_fp8_gemm_cannot_take_fall_back_to_dequant(strict_mm, n, k):
    g = torch.Generator().manual_seed(0)
    q, s = quantize_weight(torch.randn(n, k, generator=g), "e4m3fn", "per_channel")
    x = torch.randn(3, k)
    y = fp8_linear(x, q, s, None, mode="fp8")
    assert strict_mm.calls == []
    torch.testing.assert_close(y, fp8_linear(x, q, s, None, mode="dequant"))


def test_e5m2_weight_uses_tensorwise_gemm_or_falls_back(strict_mm):
    q, s = _weight(fmt="e5m2", granularity="per_tensor")
    x = torch.randn(4, 64).to(torch.bfloat16)
    fp8_linear(x, q, s, mode="fp8", act_scaling="per_tensor")
    assert strict_mm.calls[-1]["tensorwise"]
    fp8_linear(x, q, s, mode="fp8", act_scaling="per_token")  # row-wise needs e4m3fn weights
    assert len(strict_mm.calls) == 1


def test_prepare_scaled_mm_lays_out_operands_without_copying_the_weight():
    q, s = _weight()
    args = mm.prepare_scaled_mm(torch.randn(6, 64), q, s, None, torch.bfloat16, "per_token")
    assert args.b.data_ptr() == q.data_ptr() and args.b.shape == (64, 48) and args.b.stride() == (1, 64)
    assert args.a.shape == (6, 64) and args.a.is_contiguous() and args.a.dtype == E4M3
    assert args.scale_a.shape == (6, 1) and args.scale_b.shape == (1, 48)
    assert args.out_dtype == torch.bfloat16


def test_real_scaled_mm_on_this_build_agrees():
    """torch builds with a CPU `_scaled_mm` run the same arguments for real."""
    q, s = _weight()
    x = torch.randn(8, 64).to(torch.bfloat16)
    try:
        y = fp8_linear(x, q, s, None, mode="fp8")
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch build has no CPU _scaled_mm: {e}")
    assert _rel(y, _reference(x, q, s)) < 0.05


def _old_quantize_activation(x2d, act_scaling):
    """The first formulation (six passes): the fewer-pass one must give the same bytes and scales."""
    amax = x2d.abs().amax(dim=1, keepdim=True).float() if act_scaling == "per_token" else x2d.abs().amax().float()
    scale = (amax / 448.0).clamp(min=torch.finfo(torch.float32).tiny)
    return (x2d.float() / scale).clamp_(-448.0, 448.0).to(E4M3).contiguous(), scale


_DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("act_scaling", ["per_token", "per_tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_activation_quantization_equals_the_clamped_formula(act_scaling, dtype, device):
    g = torch.Generator().manual_seed(1)
    # Rows from 1e-30 to 1e4 in magnitude, a zero row, and exact powers of two at the row maxima.
    x = torch.randn(64, 96, generator=g) * torch.logspace(-30, 4, 64)[:, None]
    x[5] = 0
    x[7, 3] = 2.0 ** 10
    x = x.to(dtype).to(device)
    a, s = mm.quantize_activation(x, act_scaling)
    a_ref, s_ref = _old_quantize_activation(x, act_scaling)
    assert torch.equal(a.view(torch.uint8), a_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert a.is_contiguous() and not torch.isnan(a.float()).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (and triton)")
def test_triton_activation_quantization_is_within_one_fp8_step_of_eager():
    """The fused kernel divides with Triton's fp32 division; at most a rounding tie may fall the other way."""
    quantize_activation_triton = mm.ACT_QUANTIZERS["triton"]()
    g = torch.Generator().manual_seed(2)
    for k in (64, 3072, 15360):
        x = (torch.randn(37, k, generator=g) * torch.logspace(-3, 3, 37)[:, None]).to(torch.bfloat16).cuda()
        a, s = quantize_activation_triton(x, "per_token")
        a_ref, s_ref = mm.quantize_activation(x, "per_token")
        torch.testing.assert_close(s, s_ref, rtol=2e-7, atol=0)
        diff = (a.float() - a_ref.float()).abs() / a_ref.float().abs().clamp(min=2 ** -9)
        assert diff.max().item() <= 0.125 and (a.view(torch.uint8) != a_ref.view(torch.uint8)).float().mean() < 1e-3


def test_activation_quantization_refuses_an_unknown_scaling():
    with pytest.raises(ValueError, match="per_token, per_tensor"):
        mm.quantize_activation(torch.randn(2, 16), "per_row")


def test_options_switch_fast_accum_process_wide_and_restore(strict_mm):
    q, s = _weight()
    x = torch.randn(4, 64).to(torch.bfloat16)
    previous = mm.set_fp8_matmul_options(mm.Fp8MatmulOptions(fast_accum=True))
    try:
        fp8_linear(x, q, s, mode="fp8")
    finally:
        assert mm.set_fp8_matmul_options(previous).fast_accum is True
    fp8_linear(x, q, s, mode="fp8")
    assert [c["fast_accum"] for c in strict_mm.calls] == [True, False]
    assert mm.fp8_matmul_options() == mm.Fp8MatmulOptions()


def test_options_are_validated():
    with pytest.raises(ValueError, match="act_quant='cuda_graph' is not allowed; choose one of: auto, eager, compiled, triton"):
        mm.Fp8MatmulOptions(act_quant="cuda_graph")
    with pytest.raises(TypeError, match="Fp8MatmulOptions"):
        mm.set_fp8_matmul_options({"fast_accum": True})


# ---------------------------------------------------------------------------------------------
# capability check and mode choice
# ---------------------------------------------------------------------------------------------

def test_importing_quant_does_not_initialise_cuda():
    code = "import torch, quant; assert not torch.cuda.is_initialized(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("capability,expected", [((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_fp8_supported_needs_capability_8_9(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(mm, "_cuda_capability", lambda index: capability)
    assert mm.fp8_matmul_supported("cuda:0") is expected
    assert mm.fp8_matmul_supported("cpu") is False


def test_gpu_without_fp8_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(mm, "fp8_matmul_supported", lambda device: False)
    monkeypatch.setattr(mm, "_fallback_warning", mm._Once())
    with caplog.at_level(logging.WARNING, logger="lowvram"):
        modes = [resolve_compute("auto", "cuda:0") for _ in range(3)] + [resolve_compute("fp8", "cuda:0")]
    assert modes == ["dequant"] * 4
    warnings = [r for r in caplog.records if r.name == "lowvram" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no fp8 matmul units" in warnings[0].getMessage()


def test_cpu_auto_is_dequant_silently_and_fp8_capable_gpu_gets_fp8(monkeypatch, caplog):
    monkeypatch.setattr(mm, "_fallback_warning", mm._Once())
    with caplog.at_level(logging.WARNING, logger="lowvram"):
        assert resolve_compute("auto", "cpu") == "dequant"
    assert caplog.records == []
    monkeypatch.setattr(mm, "fp8_matmul_supported", lambda device: True)
    assert resolve_compute("auto", "cuda:0") == "fp8"
    assert resolve_compute("dequant", "cuda:0") == "dequant"
    with pytest.raises(ValueError, match="auto, fp8, dequant"):
        resolve_compute("fast", "cpu")


# ---------------------------------------------------------------------------------------------
# torch.compile (ComfyUI's TorchCompileModel on our model): one graph per Linear, no break
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fp8", "dequant"])
def test_fp8_linear_traces_into_one_graph_under_torch_compile(strict_mm, monkeypatch, mode):
    # A graph break at each Linear would keep inductor from fusing the activation quantization with
    # the norm/modulation before it: the whole reason to compile. fullgraph=True turns a break into an error.
    monkeypatch.setattr(mm, "FP8_GEMM_DEVICE_TYPES", ("cuda", "cpu"))   # CPU tensors stand for CUDA ones
    torch._dynamo.reset()
    q, s = _weight(granularity="per_channel")
    x = torch.randn(4, 9, 64).to(torch.bfloat16)
    bias = torch.randn(48).to(torch.bfloat16)
    compiled = torch.compile(lambda x: fp8_linear(x, q, s, bias, mode=mode), backend="eager", fullgraph=True)
    got, want = compiled(x), fp8_linear(x, q, s, bias, mode=mode)
    torch._dynamo.reset()
    assert torch.equal(got, want)
    if mode == "fp8":   # the compiled call (dynamo replays the fake's side effect) and the eager one
        assert len(strict_mm.calls) == 2 and not strict_mm.calls[0]["tensorwise"]


def test_compiled_graph_quantizes_activations_with_the_fusable_pytorch_version(strict_mm, monkeypatch):
    monkeypatch.setattr(mm, "FP8_GEMM_DEVICE_TYPES", ("cuda", "cpu"))
    def opaque(*a, **k):
        raise AssertionError("a separate quantizer kernel must not be used inside torch.compile")
    monkeypatch.setitem(mm.ACT_QUANTIZERS, "auto", lambda: opaque)
    torch._dynamo.reset()
    q, s = _weight(granularity="per_channel")
    x = torch.randn(5, 64).to(torch.bfloat16)
    got = torch.compile(lambda x: fp8_linear(x, q, s, mode="fp8"), backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()
    assert _rel(got, _reference(x, q, s, None)) < 0.05
    with pytest.raises(AssertionError, match="separate quantizer"):
        fp8_linear(x, q, s, mode="fp8")   # eagerly the table's quantizer is used


def test_a_dequant_fallback_is_counted_and_logged_once_per_reason(strict_mm, monkeypatch, caplog):
    monkeypatch.setattr(mm, "FALLBACKS", {})
    q, s = _weight(granularity="per_channel")
    q48 = q[:, :48].contiguous()   # K = 48 is fine; N = 40 is not a multiple of 16
    q40, s40 = q[:40].contiguous(), s[:40]
    x = torch.randn(3, 64).to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="lowvram"):
        for _ in range(3):
            fp8_linear(x, q40, s40, mode="fp8")
        fp8_linear(x[:, :48], q48, s, mode="fp8")
    reason = "weight shape [40, 64] is not divisible by 16"
    assert mm.FALLBACKS == {reason: 3} and strict_mm.calls and len(strict_mm.calls) == 1
    logged = [r.getMessage() for r in caplog.records if r.name == "lowvram"]
    assert len(logged) == 1 and reason in logged[0]


def test_a_call_asks_for_fast_accumulation_itself(strict_mm):
    # A model loaded with fast accumulation asks for it per call; the process-wide option stays as it was.
    q, s = _weight()
    x = torch.randn(4, 64).to(torch.bfloat16)
    fp8_linear(x, q, s, mode="fp8", fast_accum=True)
    fp8_linear(x, q, s, mode="fp8", fast_accum=False)
    fp8_linear(x, q, s, mode="fp8")
    assert [c["fast_accum"] for c in strict_mm.calls] == [True, False, False]
