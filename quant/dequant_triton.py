"""fp8 weight -> bf16/fp16 weight times its scale, in one Triton kernel (the dequant compute path).

quant.matmul.dequantize_weight_eager takes two PyTorch kernels (fp8 -> bf16 copy, then an in-place
multiply by the scale) and PyTorch's fp8 copy kernel converts element by element in software: on an
H200 the pair cost about as much as the bf16 matmul it feeds (bench/results/float8_flux_*0706*,
linear_dequant 0.145 s a Flux step against 0.077 for bf16 F.linear). This kernel reads 1 byte and
writes 2 per weight and multiplies in fp32 before one rounding (the eager pair rounds the scale to bf16
first, so the two differ in the last bit now and then; this one is the more exact).

The fp8 bits are decoded without Triton's fp8 types, which exist only on GPUs of compute capability 8.9+,
while dequant is the path of exactly the GPUs without fp8 units (RTX 30xx, A100). Both fp8 formats are
fp16 with fewer bits: e5m2 is the top byte of an fp16, and e4m3's sign, exponent and mantissa placed in an
fp16's sign, low exponent and top mantissa bits give that fp16 the e4m3 value times 2^-8 (exponent bias 15
instead of 7; subnormals come out right by the same shift). So a weight costs two masks, a shift and an
or, and the 2^8 goes into the scale, where multiplying by a power of two is exact: the result is bit for
bit the fp32 product of the fp8 value and its scale, rounded once.

Imported only where the `triton` package is (Linux + CUDA); CPU tensors go to the eager version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .matmul import dequantize_weight_eager  # matmul imports this module only when first asked, after it loaded
from .triton_launch import launch

# fp8 dtype -> (is e4m3, factor the fp16 reading of the bits is short by). NaN/inf codes are not decoded
# specially: the loader refuses non-finite weights, so they never reach this kernel.
_FORMATS = {torch.float8_e4m3fn: (True, 256.0), torch.float8_e5m2: (False, 1.0)}


@dataclass(frozen=True)
class DequantTile:
    """One program's share: `rows` weight rows by `block_k` columns, on `warps` warps (powers of two)."""

    rows: int = 4
    block_k: int = 1024
    warps: int = 4

    def __post_init__(self):
        for name in ("rows", "block_k", "warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"DequantTile.{name}={v} must be a power of two")


# Measured on the H200 over one Flux step's 304 weights (bench.dequant_sweep, results/dequant_sweep_*T2248*):
# 9.55 ms, within 2% of the sweep's fastest tile (2 x 4096: 9.34 ms) and the faster of the two inside the whole
# dequant Linear (94.7 against 96.5 ms a step); the previous kernel took 13.57 ms.
DEFAULT_TILE = DequantTile()


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, SCALE_PER_ROW: tl.constexpr, E4M3: tl.constexpr,
                    FACTOR: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    # w [N, K] fp8 bytes (as uint8) row-major, s [N] (or [1]) fp32, out [N, K] bf16/fp16. Program (row block, column block): a [ROWS, BLOCK_K] tile and its ROWS scales.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    b = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.uint16)
    if E4M3:   # sign to bit 15; exponent and mantissa to bits 7..13 (fp16's low exponent, top mantissa)
        h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    else:      # e5m2 is fp16's top byte
        h = b << 8
    w = h.to(tl.float16, bitcast=True).to(tl.float32)
    if SCALE_PER_ROW:
        s = tl.load(s_ptr + rows, mask=rows < N, other=0.0)[:, None]
    else:
        s = tl.load(s_ptr)
    tl.store(out_ptr + offs, (w * (s * FACTOR)).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_weight_triton(w_fp8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w_fp8 [N, K] * w_scale ([N] or []) as a new `dtype` tensor [N, K]; same contract as the eager one."""
    if w_fp8.device.type != "cuda" or w_fp8.numel() == 0 or w_fp8.ndim != 2 or w_fp8.dtype not in _FORMATS:
        return dequantize_weight_eager(w_fp8, w_scale, dtype)
    return launch_dequant(w_fp8, w_scale, dtype)


def launch_dequant(w_fp8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype,
                   tile: DequantTile = DEFAULT_TILE) -> torch.Tensor:
    """The kernel launch itself, on whatever device the tensors are (CPU under TRITON_INTERPRET=1: tests)."""
    w = w_fp8 if w_fp8.is_contiguous() else w_fp8.contiguous()
    e4m3, factor = _FORMATS[w.dtype]
    scale = w_scale.to(device=w.device, dtype=torch.float32).reshape(-1).contiguous()   # [N] or [1]
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    n, k = w.shape
    grid = (triton.cdiv(n, tile.rows), triton.cdiv(k, tile.block_k))
    launch(_dequant_kernel, grid, w.view(torch.uint8), scale, out, n, k, SCALE_PER_ROW=scale.numel() > 1, E4M3=e4m3,
           FACTOR=factor, ROWS=tile.rows, BLOCK_K=tile.block_k, num_warps=tile.warps)
    return out
