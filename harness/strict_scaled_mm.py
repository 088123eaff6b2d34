"""A stand-in for torch._scaled_mm on the CPU that checks every argument as the CUDA kernel would (ATen's
ScaledBlas.cpp rules) and computes in float64: the fp8 GEMM path's tests run without a GPU."""
import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


class StrictScaledMM:
    """Checks every argument the way the CUDA kernel would, then computes the result in float64."""

    def __init__(self):
        self.calls = []

    def __call__(self, a, b, scale_a, scale_b, bias=None, out_dtype=None, use_fast_accum=False, **kw):
        m, k = a.shape
        n = b.shape[1]
        assert a.dtype == E4M3 and b.dtype in (E4M3, E5M2)
        assert not (a.dtype == E5M2 and b.dtype == E5M2)
        assert a.is_contiguous(), "mat1 must be row-major"
        assert b.stride() == (1, k), "mat2 must be column-major"
        assert b.shape[0] == k and k % 16 == 0 and n % 16 == 0
        assert scale_a.dtype == torch.float32 and scale_b.dtype == torch.float32
        tensorwise = scale_a.numel() == 1 and scale_b.numel() == 1
        rowwise = (scale_a.shape == (m, 1) and scale_a.is_contiguous()
                   and scale_b.shape == (1, n) and scale_b.stride(1) == 1 and scale_b.t().is_contiguous())
        assert tensorwise or rowwise, f"invalid scaling pair {scale_a.shape} x {scale_b.shape}"
        if rowwise and not tensorwise:
            assert out_dtype == torch.bfloat16 and b.dtype == E4M3
        if bias is not None:
            assert out_dtype in (torch.bfloat16, torch.float16) and bias.dtype == out_dtype and bias.numel() == n
        self.calls.append({"m": m, "k": k, "n": n, "tensorwise": tensorwise, "bias": bias is not None,
                           "out_dtype": out_dtype, "fast_accum": use_fast_accum})
        y = (a.double() * scale_a.double()) @ (b.double() * scale_b.double())
        if bias is not None:
            y = y + bias.double()
        return y.to(out_dtype)
