"""A SwiGLU feed-forward, down(silu(gate(x)) * up(x)), whose three projections are fp8 with per-token
activations, in five kernels: one quantization of x, the gate and up GEMMs, one kernel for silu, product and
quantization (quant.swiglu_triton), the down GEMM.

The same three layers called one by one (fp8_linear each, F.silu and * between them, as NewBie's and
Z-Image's `FeedForward.forward` does) take eight kernels: x is quantized twice, once per projection, and the
[M, H] hidden activations go through silu, multiply and quantizer separately. The result is the same, bit
for bit on a GPU with Triton (swiglu_unfused is that path, for tests and benchmarks).

    >>> fp8_swiglu_takes(torch.ones(2, 16), *(Fp8Weights(torch.ones(16, 16).to(torch.float8_e4m3fn),
    ...                                       torch.ones(16), None),) * 3)   # a CPU input: the GEMM is CUDA's
    False
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .matmul import _act_quantizer, _gemm_takes, fp8_matmul_options, linear_fp8, run_scaled_mm, scaled_mm_args

PER_TOKEN = "per_token"


class Fp8Weights(NamedTuple):
    """One projection: weight fp8 [N, K], its scale fp32 [N] or [], bias [N] or None."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None


def silu_mul_eager(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F.silu(gate) * up [M, H], quantized per token by the activation quantizer the unfused path uses (so on a
    GPU with Triton, quant.act_quant_triton's kernel): the reference of the fused kernel, and its fallback."""
    return _act_quantizer()(F.silu(gate) * up, PER_TOKEN)


@functools.lru_cache(maxsize=None)
def silu_mul_quantizer() -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """quant.swiglu_triton's kernel for CUDA tensors where the triton package imports (it overwrites gate: pass
    a temporary); silu_mul_eager elsewhere."""
    try:
        from .swiglu_triton import launch_silu_mul_
    except ImportError:
        return silu_mul_eager

    def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_silu_mul_(gate, up) if gate.is_cuda else silu_mul_eager(gate, up)
    return silu_mul


def fp8_swiglu_takes(x: torch.Tensor, gate: Fp8Weights, up: Fp8Weights, down: Fp8Weights) -> bool:
    """Whether fp8_swiglu gives this call the unfused path's bits: a bf16 input (the row-wise GEMMs give
    bf16, so no cast sits between the ops) on a device whose fp8 GEMM takes all three layers, outside
    torch.compile (which fuses the unfused ops itself)."""
    return (x.dtype == torch.bfloat16 and x.shape[-1] == gate.weight.shape[1] == up.weight.shape[1]
            and gate.weight.shape == up.weight.shape and down.weight.shape[1] == gate.weight.shape[0]
            and all(_gemm_takes(x, w.weight, w.scale) for w in (gate, up, down)))


def fp8_swiglu(x: torch.Tensor, gate: Fp8Weights, up: Fp8Weights, down: Fp8Weights,
               fast_accum: bool | None = None) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for x [..., K] bf16 -> [..., N]; call only where fp8_swiglu_takes says so.
    fast_accum: the GEMMs' fast accumulation (None: the process-wide Fp8MatmulOptions.fast_accum)."""
    x2d = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])             # [M, K]
    fast = fp8_matmul_options().fast_accum if fast_accum is None else fast_accum
    a, scale_a = _act_quantizer()(x2d, PER_TOKEN)                      # [M, K] e4m3fn, [M, 1]
    g = run_scaled_mm(scaled_mm_args(a, scale_a, *gate, torch.bfloat16, PER_TOKEN, fast))   # [M, H] bf16
    u = run_scaled_mm(scaled_mm_args(a, scale_a, *up, torch.bfloat16, PER_TOKEN, fast))     # [M, H] bf16
    del a
    h, scale_h = silu_mul_quantizer()(g, u)                            # [M, H] e4m3fn, [M, 1]; g overwritten
    del g, u
    out = run_scaled_mm(scaled_mm_args(h, scale_h, *down, torch.bfloat16, PER_TOKEN, fast))  # [M, N] bf16
    return out if x.ndim == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


def swiglu_unfused(x: torch.Tensor, gate: Fp8Weights, up: Fp8Weights, down: Fp8Weights,
                   fast_accum: bool | None = None) -> torch.Tensor:
    """The layer-by-layer path fp8_swiglu replaces (what ComfyUI's FeedForward.forward does with fp8 layers)."""
    def lin(t: torch.Tensor, w: Fp8Weights) -> torch.Tensor:
        return linear_fp8(t, w.weight, w.scale, w.bias, t.dtype, PER_TOKEN, fast_accum)

    return lin(F.silu(lin(x, gate)) * lin(x, up), down)
