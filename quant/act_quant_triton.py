"""Per-token fp8 activation quantization in one Triton kernel (the default quantizer where triton imports).

quant.matmul.quantize_activation takes three PyTorch kernels (amax, divide into fp32, cast): about
13 bytes of memory traffic per element. This kernel gives each token (row of x [M, K]) one program:
it reads the row for its amax, reads it again (from cache) to scale and cast, and writes the fp8 row
and the scale: 3 bytes per element. Imported only when asked for; needs the `triton` package (Linux
with CUDA). Per-tensor scaling and non-CUDA tensors go to the PyTorch version.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .matmul import quantize_activation
from .triton_launch import launch

# Globals a Triton kernel reads must be constexpr objects.
_E4M3_MAX = tl.constexpr(448.0)
_TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal fp32: an all-zero row gets a finite scale
# One launch configuration for every K, and K and the row stride left unspecialized: Triton compiles this
# kernel once per input dtype, not once per (block size, K % 16, stride % 16) combination. Each compile is
# paid in the first prompt on a machine whose kernel cache on disk is empty (NewBie's 6 GiB graph: 14.4 s
# cold against 12.1 s after a warm-up start, bench/results/workflows_e2e_*T2304 / T2308), and NewBie
# alone has K of 1024, 2304, 2560, 9216 and 10240. A [1024]-wide tile in a loop reads a row in a few
# steps; the second pass finds it in L2.
BLOCK_K = 1024
NUM_WARPS = 4


# The row's scale from the running |x| maxima acc [BLOCK_K] (fp32): stored, and returned. Shared with
# quant.swiglu_triton, so that both kernels scale exactly alike.
@triton.jit
def store_row_scale(s_ptr, row, acc):
    scale = tl.maximum(tl.max(acc, axis=0) / _E4M3_MAX, _TINY)
    tl.store(s_ptr + row, scale)
    return scale


# The codes of one row: src_row[0:K] (any float dtype) / scale, cast to e4m3 into a_row. Shared with
# quant.swiglu_triton: the same division and cast give the same codes.
@triton.jit
def store_e4m3_row(src_row, a_row, K, scale, BLOCK_K: tl.constexpr):
    offs = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(src_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(a_row + k0 + offs, (x / scale).to(tl.float8e4nv), mask=mask)


@triton.jit(do_not_specialize=["K", "stride_xm"])
def _per_token_e4m3_kernel(x_ptr, a_ptr, s_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    offs = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x))
    scale = store_row_scale(s_ptr, row, acc)
    store_e4m3_row(x_row, a_ptr + row * K, K, scale, BLOCK_K)


def quantize_activation_triton(x2d: torch.Tensor, act_scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as quant.matmul.quantize_activation: (a [M, K] e4m3fn, scale fp32 [M, 1])."""
    if act_scaling != "per_token" or x2d.device.type != "cuda" or x2d.numel() == 0:
        return quantize_activation(x2d, act_scaling)
    return launch_per_token(x2d)


def launch_per_token(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel launch itself, on whatever device x is (CPU under TRITON_INTERPRET=1: tests)."""
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    m, k = x2d.shape
    a = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2d.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x2d.device)
    launch(_per_token_e4m3_kernel, (m,), x2d, a, scale, k, x2d.stride(0), BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return a, scale
