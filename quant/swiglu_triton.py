"""silu(x1) * x3 and its per-token e4m3 quantization in one Triton kernel: the down projection's input of a
SwiGLU feed-forward (NewBie's and Z-Image's `FeedForward`: w2(silu(w1(x)) * w3(x))).

Unfused, a bf16 SwiGLU between its GEMMs runs three kernels over the [M, H] hidden activations: silu (reads
x1, writes s), multiply (reads s and x3, writes h) and the quantizer (reads h twice, writes the fp8 codes):
15 bytes of traffic per bf16 element. Here each token (row) gets one program that reads its rows of x1 and
x3 once, writes the product over x1's row, then reads it back (mostly from cache) to scale and cast: 9 bytes
per element, 2 of them mostly cache hits. On an H200 (NewBie, M = 4396, H = 9216; `python -m bench.swiglu_micro`, results
swiglu_micro_nvidia-h200_2026-11-22T1020 and T1036) this took 0.127-0.139 ms; recomputing the product in the
second pass instead took 0.164 ms (T1013), and the whole row held in registers (one 16384-wide block per row,
16 warps) 0.280 ms (T1036): the exp and IEEE division per element are much of the work.

The values are those of the unfused path, bit for bit on the GPU: silu and the product are each computed in
fp32 and rounded to the input dtype, as PyTorch's bf16 kernels do (`x / (1 + exp(-x))` with an IEEE
division and libdevice's exp, which is CUDA's expf), and the codes come from the same division by the same
scale as quant.act_quant_triton's kernel (Triton's fp32 division, which at a rounding tie may differ from
PyTorch's eager quantizer: the unfused path uses that kernel too). Needs the `triton` package (Linux with CUDA).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .act_quant_triton import BLOCK_K, NUM_WARPS, store_e4m3_row, store_row_scale
from .triton_launch import launch

# Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) has no libdevice; there the kernel takes tl.exp,
# which on a GPU would be an approximation (ex2.approx) and differ from PyTorch's silu in the last bits.
_PRECISE = os.environ.get("TRITON_INTERPRET", "0") != "1"


@triton.jit
def _gated(g_raw, u_raw, PRECISE: tl.constexpr):
    # PyTorch's F.silu(g) * u in g's dtype: each op in fp32, its result rounded to the dtype.
    g = g_raw.to(tl.float32)
    if PRECISE:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    s = tl.math.div_rn(g, 1.0 + e).to(g_raw.dtype).to(tl.float32)
    return (s * u_raw.to(tl.float32)).to(g_raw.dtype).to(tl.float32)


@triton.jit(do_not_specialize=["K", "stride_g", "stride_u"])
def _silu_mul_e4m3_kernel(g_ptr, u_ptr, a_ptr, s_ptr, K, stride_g, stride_u, BLOCK_K: tl.constexpr,
                          PRECISE: tl.constexpr):
    # Pass 1 computes the product once (exp and an IEEE division per element are most of this kernel's work),
    # writes it over the row of g, which it no longer needs, and takes the amax; pass 2 reads the product back
    # (from cache: the row was just written) to scale and cast.
    row = tl.program_id(0).to(tl.int64)
    g_row, u_row, a_row = g_ptr + row * stride_g, u_ptr + row * stride_u, a_ptr + row * K
    offs = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        g_raw = tl.load(g_row + k0 + offs, mask=mask, other=0.0)
        h = _gated(g_raw, tl.load(u_row + k0 + offs, mask=mask, other=0.0), PRECISE)
        tl.store(g_row + k0 + offs, h.to(g_raw.dtype), mask=mask)
        acc = tl.maximum(acc, tl.abs(h))
    scale = store_row_scale(s_ptr, row, acc)
    store_e4m3_row(g_row, a_row, K, scale, BLOCK_K)


def launch_silu_mul_(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [M, H] e4m3fn, scale fp32 [M, 1]) with a * scale ~= F.silu(gate) * up, for gate and up [M, H] of one
    float dtype, on whatever device they are (the CPU under TRITON_INTERPRET=1: tests). In place: gate is
    overwritten with F.silu(gate) * up (a GEMM's output the caller is done with; no [M, H] temporary)."""
    if gate.shape != up.shape or gate.ndim != 2 or gate.dtype != up.dtype:
        raise ValueError(f"launch_silu_mul_ takes gate and up of one shape [M, H] and dtype; got "
                         f"{gate.dtype} {list(gate.shape)} and {up.dtype} {list(up.shape)}")
    if gate.stride(1) != 1:
        raise ValueError("launch_silu_mul_ writes into gate, whose rows must be contiguous (stride 1 along H)")
    up = up if up.stride(1) == 1 else up.contiguous()
    m, h = gate.shape
    a = torch.empty((m, h), dtype=torch.float8_e4m3fn, device=gate.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=gate.device)
    if m:
        launch(_silu_mul_e4m3_kernel, (m,), gate, up, a, scale, h, gate.stride(0), up.stride(0), BLOCK_K=BLOCK_K,
               PRECISE=_PRECISE, num_warps=NUM_WARPS)
    return a, scale
