"""quant.swiglu: the fused fp8 SwiGLU gives the layer-by-layer path's bits with one quantization of x and
three GEMMs (a strict stand-in for torch._scaled_mm on the CPU), declines what it cannot take, and on a
GPU its Triton kernel equals PyTorch's silu, product and quantizer bit for bit."""

import pytest
import torch

import quant.matmul as mm
import quant.swiglu as sw
from harness.strict_scaled_mm import StrictScaledMM
from quant import quantize_weight
from quant.swiglu import Fp8Weights, fp8_swiglu, fp8_swiglu_takes, silu_mul_eager, swiglu_unfused

K, H = 64, 160   # input width, hidden width (multiples of 16, as the fp8 GEMM needs)


def _proj(n, k, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    w, s = quantize_weight(torch.randn(n, k, generator=g) * 0.2, "e4m3fn", "per_channel")
    b = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16) if bias else None
    return Fp8Weights(w, s, b)


def _ffn(bias=False):
    return _proj(H, K, 1, bias), _proj(H, K, 2, bias), _proj(K, H, 3, bias)   # gate, up, down


@pytest.fixture
def strict_mm(monkeypatch):
    fake = StrictScaledMM()
    monkeypatch.setattr(torch, "_scaled_mm", fake)
    monkeypatch.setattr(mm, "fp8_matmul_supported", lambda device: True)   # CPU tensors stand for CUDA ones
    return fake


@pytest.fixture
def quantizations(monkeypatch):
    """Counts activation quantizations of x (the silu-product quantizer is separate)."""
    calls = []
    real = mm._act_quantizer

    def counting():
        q = real()
        return lambda x, scaling: calls.append(tuple(x.shape)) or q(x, scaling)
    monkeypatch.setattr(mm, "_act_quantizer", counting)
    monkeypatch.setattr(sw, "_act_quantizer", counting)
    return calls


@pytest.mark.parametrize("lead", [(37,), (2, 19)])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_gives_the_unfused_bits_with_one_quantization_of_x(strict_mm, quantizations, lead, bias):
    x = (torch.randn(*lead, K, generator=torch.Generator().manual_seed(4)) * 2).to(torch.bfloat16)
    gate, up, down = _ffn(bias)
    assert fp8_swiglu_takes(x, gate, up, down)
    want = swiglu_unfused(x, gate, up, down)
    assert len(quantizations) == 3 and len(strict_mm.calls) == 3   # x twice, then the product
    quantizations.clear()
    got = fp8_swiglu(x, gate, up, down)
    m = x.numel() // K
    assert quantizations == [(m, K), (m, H)], "x must be quantized once for both projections, then the product"
    assert [(c["m"], c["k"], c["n"], c["bias"]) for c in strict_mm.calls[3:]] == \
        [(x.numel() // K, K, H, bias), (x.numel() // K, K, H, bias), (x.numel() // K, H, K, bias)]
    assert got.shape == (*lead, K) and got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_fast_accumulation_reaches_all_three_gemms(strict_mm):
    x = torch.randn(5, K).to(torch.bfloat16)
    gate, up, down = _ffn()
    assert torch.equal(fp8_swiglu(x, gate, up, down, fast_accum=True),
                       swiglu_unfused(x, gate, up, down, fast_accum=True))
    assert [c["fast_accum"] for c in strict_mm.calls] == [True] * 6
    fp8_swiglu(x, gate, up, down)
    assert [c["fast_accum"] for c in strict_mm.calls[6:]] == [False] * 3


def test_what_the_fused_path_declines(strict_mm):
    gate, up, down = _ffn()
    x = torch.randn(5, K).to(torch.bfloat16)
    assert fp8_swiglu_takes(x, gate, up, down)
    # fp16/fp32 inputs: the GEMMs give bf16, and the unfused path casts back between the ops.
    assert not fp8_swiglu_takes(x.float(), gate, up, down)
    assert not fp8_swiglu_takes(x.half(), gate, up, down)
    # widths that do not chain, and a weight the row-wise GEMM does not take
    assert not fp8_swiglu_takes(x, gate, _proj(H + 16, K, 5), down)
    assert not fp8_swiglu_takes(torch.randn(5, K + 16).to(torch.bfloat16), gate, up, down)
    e5m2 = Fp8Weights(up.weight.to(torch.float8_e5m2), up.scale, None)
    assert not fp8_swiglu_takes(x, gate, e5m2, down)


def test_a_device_without_fp8_gemm_is_declined():
    gate, up, down = _ffn()
    assert not fp8_swiglu_takes(torch.randn(5, K).to(torch.bfloat16), gate, up, down)   # the CPU


def test_the_eager_product_quantizer_is_silu_times_up_per_token():
    g = torch.Generator().manual_seed(6)
    gate, up = (torch.randn(9, H, generator=g) * 3).to(torch.bfloat16), torch.randn(9, H, generator=g).to(torch.bfloat16)
    a, s = silu_mul_eager(gate, up)
    h = (torch.nn.functional.silu(gate) * up).float()
    assert a.dtype == torch.float8_e4m3fn and s.shape == (9, 1)
    torch.testing.assert_close(s, h.abs().amax(1, keepdim=True) / 448.0)
    # e4m3 rounds to 3 mantissa bits (half a step: 2^-4 relative), subnormals to steps of 2^-9 of the scale
    assert ((a.float() * s - h).abs() <= h.abs() * 2**-4 + s * 2**-10).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,h,stride", [(4096 + 300, 9216, 9216), (7, 1000, 1024), (1, 16, 16)])
def test_the_triton_kernel_equals_pytorch_bit_for_bit_on_the_gpu(m, h, stride):
    from quant.swiglu_triton import launch_silu_mul_

    g = torch.Generator("cuda").manual_seed(7)
    gate = (torch.randn(m, stride, generator=g, device="cuda") * 4).to(torch.bfloat16)[:, :h]
    up = (torch.randn(m, stride, generator=g, device="cuda") * 2).to(torch.bfloat16)[:, :h]
    gate[0] = 0.0
    up[-1, : h // 2] = 0.0
    ref_a, ref_s = silu_mul_eager(gate, up)        # PyTorch's silu and product, the per-token Triton quantizer
    product = torch.nn.functional.silu(gate) * up
    a, s = launch_silu_mul_(gate, up)              # gate now holds the product
    assert torch.equal(s, ref_s)
    assert torch.equal(a.view(torch.uint8), ref_a.view(torch.uint8))
    assert torch.equal(gate, product)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not mm.fp8_matmul_supported("cuda"),
                    reason="needs a GPU with fp8 GEMM (compute capability 8.9+)")
def test_fused_swiglu_equals_the_unfused_path_on_the_gpu():
    g = torch.Generator().manual_seed(8)

    def proj(n, k):
        w, s = quantize_weight(torch.randn(n, k, generator=g) * 0.05, "e4m3fn", "per_channel")
        return Fp8Weights(w.cuda(), s.cuda(), None)
    gate, up, down = proj(9216, 2304), proj(9216, 2304), proj(2304, 9216)
    x = (torch.randn(4096 + 200, 2304, generator=g) * 3).to(torch.bfloat16).cuda()
    assert fp8_swiglu_takes(x, gate, up, down)
    assert torch.equal(fp8_swiglu(x, gate, up, down), swiglu_unfused(x, gate, up, down))
