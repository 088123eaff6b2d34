"""amax, scales, quantize and dequantize: pure functions on tensors.

Convention: `scale` is the dequantization factor, `w ~= q.float() * scale`, with
`scale = amax / fmt.max_finite` so the largest magnitude lands on the format's largest finite value.
A weight is [out, in]; a per-channel scale is [out] (one per output row), a per-tensor scale is [].
"""

from __future__ import annotations

import math

import torch

from .formats import Fp8Format, fp8_format

# Rows per block are chosen so a block's fp32 temporary stays near 16 MiB: a Flux linear1 weight
# [21504, 3072] would otherwise need a 264 MB fp32 copy on top of its bf16 source. Blocks also stay
# under glibc's largest mmap threshold (32 MiB), so freed temporaries are reused rather than piling up.
BLOCK_ELEMS = 1 << 22
# Smallest positive normal fp32: keeps w / scale finite when a row is all zeros.
_TINY = torch.finfo(torch.float32).tiny


def amax(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """Largest magnitude, fp32: [] per tensor, [out] per output channel (reduces dims 1..).

    >>> amax(torch.tensor([[1.0, -3.0], [0.5, 0.25]]), "per_channel")
    tensor([3.0000, 0.5000])
    >>> amax(torch.tensor([[1.0, -3.0], [0.5, 0.25]]), "per_tensor")
    tensor(3.)
    """
    # max(amax, -amin) instead of abs().amax(): no temporary the size of w. NaN propagates.
    w = w if w.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else w.float()
    if granularity == "per_tensor":
        return torch.maximum(w.amax(), -w.amin()).float()
    if granularity == "per_channel":
        dims = tuple(range(1, w.ndim))
        return torch.maximum(w.amax(dim=dims), -w.amin(dim=dims)).float()
    raise ValueError(f"amax granularity {granularity!r} is not allowed; choose per_channel or per_tensor")


def scale_from_amax(amax_: torch.Tensor, fmt: str | Fp8Format) -> torch.Tensor:
    """fp32 scale = amax / max_finite; an all-zero row (amax 0) gets scale 1 (any value works).

    >>> scale_from_amax(torch.tensor([448.0, 0.0]), "e4m3fn")
    tensor([1., 1.])
    """
    amax_ = amax_.float()
    # A tensor divisor, not a Python number: CUDA turns `t / number` into `t * (1 / number)`, which is
    # one ulp off for some amax values, and the GPU quantizer must give the CPU's bytes.
    scale = amax_ / torch.full_like(amax_, fp8_format(fmt).max_finite)
    return torch.where(amax_ > 0, scale.clamp(min=_TINY), torch.ones_like(scale))


def _scale_rows(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """[out] -> [out, 1, ...] so it broadcasts over a weight of `ndim` dims; [] stays []."""
    if scale.ndim == 0:
        return scale
    return scale.reshape(scale.shape[0], *([1] * (ndim - 1)))


def quantize(
    w: torch.Tensor, scale: torch.Tensor, fmt: str | Fp8Format, out: torch.Tensor | None = None
) -> torch.Tensor:
    """fp8 tensor q = cast(clamp(w / scale)), written into `out` if given; works in row blocks so the
    fp32 temporary stays small.

    Clamping first matters: casting a value above max_finite to e4m3fn gives NaN on some builds.

    >>> quantize(torch.tensor([[1.0, 500.0]]), torch.tensor([1.0]), "e4m3fn").float()
    tensor([[  1., 448.]])
    """
    f = fp8_format(fmt)
    scale = scale.to(device=w.device, dtype=torch.float32)
    if out is None:
        out = torch.empty(w.shape, dtype=f.dtype, device=w.device)
    if w.ndim == 0 or w.numel() == 0:
        out.copy_((w.float() / scale).clamp(-f.max_finite, f.max_finite))
        return out
    rows = max(1, BLOCK_ELEMS // max(1, w[0].numel()))
    for r0 in range(0, w.shape[0], rows):
        s = scale if scale.ndim == 0 else _scale_rows(scale[r0 : r0 + rows], w.ndim)
        # copy=True: .float() of an fp32 input is the input itself, and div_ would then modify it.
        block = w[r0 : r0 + rows].to(torch.float32, copy=True).div_(s).clamp_(-f.max_finite, f.max_finite)
        out[r0 : r0 + rows].copy_(block)  # the cast to fp8 happens in the copy, with no fp8 temporary
    return out


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w ~= q * scale in `dtype`.

    >>> dequantize(torch.tensor([[2.0, 4.0]]).to(torch.float8_e4m3fn), torch.tensor([0.5]))
    tensor([[1., 2.]])
    """
    s = _scale_rows(scale.to(device=q.device, dtype=torch.float32), q.ndim)
    return (q.float() * s).to(dtype)


def quantize_weight(
    w: torch.Tensor, fmt: str | Fp8Format = "e4m3fn", granularity: str = "per_channel"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) for a weight; granularity "none" is a plain cast with scale 1 (shape []).

    >>> q, s = quantize_weight(torch.tensor([[0.5, -1.0], [2.0, 8.0]]))
    >>> s * 448
    tensor([1., 8.])
    >>> dequantize(q, s)
    tensor([[ 0.5000, -1.0000],
            [ 2.0000,  8.0000]])
    """
    if granularity == "none":
        scale = torch.ones((), dtype=torch.float32, device=w.device)
    else:
        scale = scale_from_amax(amax(w, granularity), fmt)
    return quantize(w, scale, fmt), scale


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal to quantization-noise ratio in dB, 10*log10(sum(ref^2) / sum((ref - approx)^2)).

    >>> round(sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])), 2)
    20.0
    """
    ref64, approx64 = ref.double(), approx.double()
    noise = (ref64 - approx64).pow(2).sum().item()
    signal = ref64.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf
