"""fp8 weight -> bf16/fp16 weight times its scale, in one Triton kernel (the dequant compute path).

quant.matmul.dequantize_weight_eager takes two PyTorch kernels (fp8 -> bf16 copy, then an in-place
multiply by the scale) and PyTorch's fp8 copy kernel converts element by element in software: on an
H200 the pair cost about as much as the bf16 matmul it feeds (bench/results/float8_flux_*0706*,
linear_dequant 0.145 s a Flux step against 0.077 for bf16 F.linear). This kernel reads 1 byte and
writes 2 per weight and multiplies in fp32 before one rounding (the eager pair rounds the scale to bf16
first, so the two differ in the last bit now and then; this one is the more exact). It decodes the fp8
bits with integer arithmetic instead of Triton's fp8 types, which exist only on GPUs of compute
capability 8.9+, while dequant is the path of exactly the GPUs without fp8 units (RTX 30xx, A100); the
kernel is memory-bound, so the few integer operations cost nothing measurable.

Imported only where the `triton` package is (Linux + CUDA); CPU tensors go to the eager version.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .matmul import dequantize_weight_eager  # matmul imports this module only when first asked, after it loaded

# Elements of one weight row per program: 1024 divides every Flux/Next-DiT in_features (3072, 12288, 15360,
# 2304, ...), and with 4 warps each thread moves 8 fp8 bytes in and 16 bytes out.
_BLOCK_K = 1024

# fp8 layout per weight dtype: (exponent bits, mantissa bits, exponent bias). NaN/inf codes are not
# decoded specially: the loader refuses non-finite weights, so they never reach this kernel.
_LAYOUT = {torch.float8_e4m3fn: (4, 3, 7), torch.float8_e5m2: (5, 2, 15)}


@triton.jit
def _fp8_bits_to_f32(b, EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr, BIAS: tl.constexpr,
                     SUB_SCALE: tl.constexpr):
    # b: int32 holding one fp8 byte. Normal numbers: rebias the exponent into fp32's and shift the
    # mantissa to fp32's top bits. Subnormals (exponent 0): mantissa * 2^(1 - bias - mant_bits).
    sign = (b >> 7) & 1
    exp = (b >> MANT_BITS) & ((1 << EXP_BITS) - 1)
    mant = b & ((1 << MANT_BITS) - 1)
    normal_bits = (sign << 31) | ((exp + (127 - BIAS)) << 23) | (mant << (23 - MANT_BITS))
    normal = normal_bits.to(tl.float32, bitcast=True)
    sub = mant.to(tl.float32) * SUB_SCALE
    sub = tl.where(sign == 1, -sub, sub)
    return tl.where(exp == 0, sub, normal)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, K, SCALE_PER_ROW: tl.constexpr, BLOCK_K: tl.constexpr,
                    EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr, BIAS: tl.constexpr, SUB_SCALE: tl.constexpr):
    # w [N, K] fp8 bytes (as uint8) row-major, s [N] (or [1]) fp32, out [N, K] bf16/fp16.
    # Program (row, k block): BLOCK_K elements of one row and that row's one scale, so no element divides its
    # offset by K to find its row. Measured on the H200 (bench/results/fp8_linear_micro_dequant_*T2038): no
    # faster than the flat split it replaced (24.4 against 23.0 ms per Flux step in bench.fp8_linear_micro,
    # whose event timing includes each call's Python launch); in the model the dequant path costs about 15 ms
    # a step over bf16 (float8_flux_*T2036), close to the 35.7 GB it moves at 3 TB/s.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < K
    offs = row * K + cols
    b = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.int32)
    w = _fp8_bits_to_f32(b, EXP_BITS, MANT_BITS, BIAS, SUB_SCALE)
    if SCALE_PER_ROW:
        s = tl.load(s_ptr + row)
    else:
        s = tl.load(s_ptr)
    tl.store(out_ptr + offs, (w * s).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_weight_triton(w_fp8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w_fp8 [N, K] * w_scale ([N] or []) as a new `dtype` tensor [N, K]; same contract as the eager one."""
    if w_fp8.device.type != "cuda" or w_fp8.numel() == 0 or w_fp8.ndim != 2 or w_fp8.dtype not in _LAYOUT:
        return dequantize_weight_eager(w_fp8, w_scale, dtype)
    return launch_dequant(w_fp8, w_scale, dtype)


def launch_dequant(w_fp8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernel launch itself, on whatever device the tensors are (CPU under TRITON_INTERPRET=1: tests)."""
    w = w_fp8 if w_fp8.is_contiguous() else w_fp8.contiguous()
    scale = w_scale.to(device=w.device, dtype=torch.float32).reshape(-1).contiguous()
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    exp_bits, mant_bits, bias = _LAYOUT[w.dtype]
    grid = (w.shape[0], triton.cdiv(w.shape[1], _BLOCK_K))
    _dequant_kernel[grid](w.view(torch.uint8), scale, out, w.shape[1], SCALE_PER_ROW=scale.numel() > 1,
                          BLOCK_K=_BLOCK_K, EXP_BITS=exp_bits, MANT_BITS=mant_bits, BIAS=bias,
                          SUB_SCALE=2.0 ** (1 - bias - mant_bits), num_warps=4)
    return out
