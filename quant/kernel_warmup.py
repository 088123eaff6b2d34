"""Compile (or load from Triton's cache) the fp8 path's Triton kernels while the server starts.

On a machine whose Triton cache is empty, the first prompt built them at their first launches: Triton's CUDA
driver module (a C file built with the system compiler, 1.26 s) and the per-token quantizer and fused SwiGLU
kernels (ptxas), 2.12 s of the 6 GiB NewBie first prompt on the H200
(bench/results/gpu_rounds_nvidia-h200_2026-11-22T1714.log, call trees of a fresh machine's first prompt). With
a warm cache, the same launches load them in well under a second. The launches here are the real ones on tiny
bf16 tensors, so the kernels come out specialised as a model's layers ask for them (16-byte aligned pointers,
sizes divisible by 16: every width of Flux, NewBie, Z-Image and their text encoders).
"""
from __future__ import annotations

import torch

from .matmul import fp8_matmul_supported

DIM, HIDDEN = 2304, 9216   # NewBie's width and SwiGLU hidden size (any multiples of 16 specialise alike)


def warm_fp8_kernels(device: str = "cuda") -> bool:
    """Run the per-token activation quantizer and the fused SwiGLU kernel once on `device`; False (nothing
    run) where the GPU has no fp8 GEMM, so those kernels are never used."""
    if not fp8_matmul_supported(device):
        return False
    from .act_quant_triton import launch_per_token
    from .swiglu_triton import launch_silu_mul_

    x = torch.zeros(1, DIM, dtype=torch.bfloat16, device=device)
    launch_per_token(x)
    gate_up = torch.zeros(1, 2 * HIDDEN, dtype=torch.bfloat16, device=device)   # one GEMM's [M, 2H] output
    launch_silu_mul_(gate_up[:, :HIDDEN], gate_up[:, HIDDEN:])
    torch.cuda.synchronize(device)
    return True
