"""y = x @ (w_fp8 * scale).T + bias, by fp8 tensor cores (`torch._scaled_mm`) or by bf16 dequant.

Nothing here touches CUDA at import; the capability check runs on first use and is cached.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .formats import ACT_SCALINGS, COMPUTE_MODES, FP8_FORMATS

log = logging.getLogger("lowvram")

_E4M3 = FP8_FORMATS["e4m3fn"]
# Device types whose fp8 layers may run torch._scaled_mm; the one check left inside torch.compile.
FP8_GEMM_DEVICE_TYPES = ("cuda",)
_TINY = torch.finfo(torch.float32).tiny
# Output dtypes the row-wise kernels produce; other requests compute in bf16 and cast at the end.
_GEMM_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP8_DTYPES = tuple(f.dtype for f in FP8_FORMATS.values())


# ---------------------------------------------------------------------------------------------
# Capability and mode choice
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """True on CUDA GPUs with fp8 tensor cores: compute capability >= 8.9 (Ada RTX 40xx, Hopper, Blackwell).

    ROCm is left out on purpose: MI300 uses the fnuz fp8 variants, which our files do not store.
    >>> fp8_matmul_supported("cpu")
    False
    """
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip or not hasattr(torch, "_scaled_mm"):
        return False
    if not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index) >= (8, 9)


# (fp8_matmul_supported, device) -> its answer. The per-call paths ask this memo: the full check costs a few
# microseconds (CUDA runtime queries), paid on every Linear of every step otherwise. The function itself is
# part of the key so that a replaced check (tests put a fake one in) is asked again, never answered stale.
_GEMM_DEVICES: dict[tuple[Callable[..., bool], torch.device], bool] = {}


def fp8_gemm_on(device: torch.device) -> bool:
    """fp8_matmul_supported(device), asked once per device."""
    key = (fp8_matmul_supported, device)
    known = _GEMM_DEVICES.get(key)
    if known is None:
        known = _GEMM_DEVICES[key] = fp8_matmul_supported(device)
    return known


class _Once:
    """A flag that is true exactly once per process: the fallback warning is said once, not per layer."""

    def __init__(self) -> None:
        self.done = False

    def first(self) -> bool:
        first, self.done = not self.done, True
        return first


_fallback_warning = _Once()


def resolve_compute(mode: str, device: torch.device | str) -> str:
    """"fp8" or "dequant" for a requested compute mode on `device`.

    "auto" picks fp8 where the device has fp8 units. A GPU without them (or an explicit "fp8" request
    that cannot be met) falls back to dequant with one warning under the "lowvram" logger.
    >>> resolve_compute("auto", "cpu"), resolve_compute("dequant", "cuda")
    ('dequant', 'dequant')
    """
    if mode not in COMPUTE_MODES:
        raise ValueError(f"compute mode {mode!r} is not allowed; choose one of: {', '.join(COMPUTE_MODES)}")
    if mode == "dequant":
        return "dequant"
    device = torch.device(device)
    if fp8_gemm_on(device):
        return "fp8"
    if (mode == "fp8" or device.type == "cuda") and _fallback_warning.first():
        log.warning(
            "LowVRAM Kit: %s has no fp8 matmul units (they need an NVIDIA GPU of compute capability 8.9+, "
            "e.g. RTX 40xx or H100); fp8 weights are dequantized to bf16 for each matmul instead: same "
            "VRAM for weights, somewhat slower.",
            device,
        )
    return "dequant"


# ---------------------------------------------------------------------------------------------
# The two compute paths
# ---------------------------------------------------------------------------------------------

def _out_dtype(x: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return x.dtype if x.dtype in _FLOAT_DTYPES else torch.bfloat16


def dequantize_weight_eager(w_fp8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w_fp8 [N, K] * w_scale ([N] or []) as a new `dtype` tensor: two PyTorch kernels, any device."""
    w = w_fp8.to(dtype)
    scale = w_scale.to(device=w.device, dtype=dtype)
    return w.mul_(scale if scale.ndim == 0 else scale.reshape(-1, 1))


def _triton_dequantize_weight() -> Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]:
    from .dequant_triton import dequantize_weight_triton  # needs the triton package (Linux + CUDA)

    return dequantize_weight_triton


@functools.lru_cache(maxsize=None)
def _auto_dequantize_weight() -> Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]:
    # One Triton kernel where the package is importable (it hands CPU tensors to the eager version).
    try:
        return _triton_dequantize_weight()
    except ImportError:
        return dequantize_weight_eager


# Fp8MatmulOptions.dequant -> the weight dequantizer of the dequant path (a factory: nothing imports early).
DEQUANTIZERS: dict[str, Callable[[], Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]]] = {
    "auto": _auto_dequantize_weight,
    "eager": lambda: dequantize_weight_eager,
    "triton": _triton_dequantize_weight,
}


def linear_dequant(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """F.linear in `out_dtype` with the weight dequantized just for this call ([out, in] temporary)."""
    # Inside torch.compile: the PyTorch version, which inductor turns into one fused kernel by itself.
    dequantize = dequantize_weight_eager if torch.compiler.is_compiling() else DEQUANTIZERS[_options.dequant]()
    w = dequantize(w_fp8, w_scale, out_dtype)
    b = bias.to(out_dtype) if bias is not None else None
    return F.linear(x.to(out_dtype), w, b)


# Per-token / per-tensor amax of x [M, K] as fp32 [M, 1] / [1, 1], in one reduction that reads x once
# (no |x| temporary). The [1, 1] shape keeps the division below in fp32 (see quantize_activation).
_ACT_AMAX: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "per_token": lambda x: torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True, dtype=torch.float32),
    "per_tensor": lambda x: torch.linalg.vector_norm(x, float("inf"), dtype=torch.float32).reshape(1, 1),
}


def quantize_activation(x2d: torch.Tensor, act_scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [M, K] e4m3fn row-major, scale fp32 [M, 1] per token or [] per tensor), x2d ~= a * scale.

    Three passes over x: amax, divide (bf16 in, fp32 out), cast. No clamp is needed: |x| / (amax / 448)
    exceeds 448 by at most one fp32 rounding, which the cast rounds back to 448 (e4m3fn turns to NaN only
    from 480 up). The scale keeps its dims in the division on purpose: a 0-dim fp32 scale would not take
    part in type promotion and a bf16 x would be divided in bf16.
    >>> a, s = quantize_activation(torch.tensor([[1.0, -4.0], [0.5, 0.25]]), "per_token")
    >>> (a.float() * s).tolist(), s.shape
    ([[1.0, -4.0], [0.5, 0.25]], torch.Size([2, 1]))
    """
    if act_scaling not in _ACT_AMAX:
        raise ValueError(f"act_scaling {act_scaling!r} is not allowed; choose one of: {', '.join(ACT_SCALINGS)}")
    scale = (_ACT_AMAX[act_scaling](x2d) / _E4M3.max_finite).clamp_(min=_TINY)
    a = torch.div(x2d, scale).to(_E4M3.dtype)
    return a, (scale if act_scaling == "per_token" else scale.reshape(()))


@functools.lru_cache(maxsize=None)
def _compiled_quantize_activation() -> Callable[[torch.Tensor, str], tuple[torch.Tensor, torch.Tensor]]:
    # One fused kernel per act_scaling instead of three; dynamic=True: one graph for every M and K.
    return torch.compile(quantize_activation, dynamic=True)


def _triton_quantize_activation() -> Callable[[torch.Tensor, str], tuple[torch.Tensor, torch.Tensor]]:
    from .act_quant_triton import quantize_activation_triton  # needs the triton package (Linux + CUDA)

    return quantize_activation_triton


@functools.lru_cache(maxsize=None)
def _auto_quantize_activation() -> Callable[[torch.Tensor, str], tuple[torch.Tensor, torch.Tensor]]:
    # The one-kernel Triton quantizer where the triton package is importable (it falls back to the
    # PyTorch version itself for CPU tensors and per-tensor scaling); the three-kernel version elsewhere.
    # On an H200 it took Flux-dev from 1.01x to 0.82x of resident bf16 (bench/results/offload_flux_*0718*).
    try:
        return _triton_quantize_activation()
    except ImportError:
        return quantize_activation


# Fp8MatmulOptions.act_quant -> the activation quantizer (a factory, so nothing compiles or imports before use).
ACT_QUANTIZERS: dict[str, Callable[[], Callable[[torch.Tensor, str], tuple[torch.Tensor, torch.Tensor]]]] = {
    "auto": _auto_quantize_activation,
    "eager": lambda: quantize_activation,
    "compiled": _compiled_quantize_activation,
    "triton": _triton_quantize_activation,
}


@dataclass(frozen=True)
class Fp8MatmulOptions:
    """Process-wide knobs of the fp8 GEMM path, for experiments (bench/fp8_flux.py measures them);
    the loader node uses the defaults.

    fast_accum: Hopper's fp8 tensor cores accumulate in reduced precision; by default the GEMM moves
    partial sums to fp32 now and then, fast accumulation skips that (faster, less exact).
    act_quant: "auto" (triton where importable, else eager), "eager" (three PyTorch kernels), "compiled"
    (torch.compile fuses them; compiles on first use, seconds) or "triton" (one hand-written kernel for
    per-token scales: quant.act_quant_triton).
    dequant: the weight dequantizer of the dequant path: "auto" (triton where importable, else eager),
    "eager" (two PyTorch kernels) or "triton" (one kernel: quant.dequant_triton).
    """

    fast_accum: bool = False
    act_quant: str = "auto"
    dequant: str = "auto"

    def __post_init__(self) -> None:
        for field, allowed in (("act_quant", ACT_QUANTIZERS), ("dequant", DEQUANTIZERS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"Fp8MatmulOptions.{field}={getattr(self, field)!r} is not allowed; choose one "
                                 f"of: {', '.join(allowed)}")


_options = Fp8MatmulOptions()


def set_fp8_matmul_options(options: Fp8MatmulOptions) -> Fp8MatmulOptions:
    """Use `options` for every fp8 GEMM in this process from now on; returns the previous options."""
    global _options
    if not isinstance(options, Fp8MatmulOptions):
        raise TypeError(f"set_fp8_matmul_options takes an Fp8MatmulOptions, not {type(options).__name__}")
    previous, _options = _options, options
    return previous


def fp8_matmul_options() -> Fp8MatmulOptions:
    return _options


def scaled_mm_unsupported_reason(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, act_scaling: str) -> str | None:
    """Why `torch._scaled_mm` cannot take this call (None if it can). A CUDA device with fp8 units; rules from torch's checks:
    K and N divisible by 16 (M is free); B column-major, i.e. the weight [N, K] contiguous so that
    w.t() is a view; scales of both operands tensor-wise or both row-wise; no e5m2 x e5m2; and (kept
    conservative) row-wise scaling only with e4m3fn weights, as the CUTLASS row-wise kernel wants.
    The common call does not come here (see _gemm_takes): formatting these messages costs host time.
    """
    n, k = w_fp8.shape
    rowwise = w_scale.numel() > 1 or act_scaling == "per_token"
    # Under torch.compile the capability query (cached, CUDA runtime) would break the graph at every
    # Linear; the load already resolved compute="fp8" for this device, so only the device type is checked.
    supported = (x.device.type in FP8_GEMM_DEVICE_TYPES if torch.compiler.is_compiling()
                 else fp8_gemm_on(x.device))
    checks = (
        # ComfyUI may run a layer on the CPU (a text encoder it could not fit, lowvram): torch's CPU
        # _scaled_mm takes tensor-wise scales only, and has no fp8 units to win anything with.
        (not supported, f"input on {x.device}, which has no fp8 GEMM"),
        (w_fp8.dtype not in _FP8_DTYPES, f"weight dtype {w_fp8.dtype} is not fp8"),
        (x.dtype not in _FLOAT_DTYPES, f"input dtype {x.dtype} is not bf16/fp16/fp32"),
        (k % 16 != 0 or n % 16 != 0, f"weight shape [{n}, {k}] is not divisible by 16"),
        (not w_fp8.is_contiguous(), "weight is not contiguous (B must be column-major)"),
        (w_scale.numel() not in (1, n), f"weight scale has {w_scale.numel()} elements, not 1 or {n}"),
        (rowwise and w_fp8.dtype != _E4M3.dtype, "row-wise scaling needs e4m3fn weights"),
    )
    return next((reason for failed, reason in checks if failed), None)


def _gemm_takes(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor) -> bool:
    """The common call (e4m3fn weight, float input, eager) in one expression, so that it skips the checks
    above: True only where scaled_mm_unsupported_reason returns None; False sends the call to them."""
    n, k = w_fp8.shape
    return (w_fp8.dtype == _E4M3.dtype and x.dtype in _FLOAT_DTYPES and not (n % 16 or k % 16)
            and w_scale.numel() in (1, n) and w_fp8.is_contiguous() and not torch.compiler.is_compiling()
            and fp8_gemm_on(x.device))


def _act_quantizer() -> Callable[[torch.Tensor, str], tuple[torch.Tensor, torch.Tensor]]:
    """The activation quantizer for this call. Inside torch.compile (ComfyUI's TorchCompileModel node on
    our model) it is the plain PyTorch version: inductor fuses its amax, divide and cast with the ops that
    produced x (norm, modulation), which no separate kernel can; a Triton launch would be opaque to it."""
    if torch.compiler.is_compiling():
        return quantize_activation
    return ACT_QUANTIZERS[_options.act_quant]()


class ScaledMMArgs(NamedTuple):
    """The arguments of one `torch._scaled_mm` call, built and checked on any device. A NamedTuple: it is
    built on every Linear call, and a frozen dataclass takes microseconds to construct."""

    a: torch.Tensor  # [M, K] e4m3fn, row-major
    b: torch.Tensor  # [K, N] fp8, column-major (a transposed view of the weight [N, K])
    scale_a: torch.Tensor  # fp32: [M, 1] row-wise or [] tensor-wise
    scale_b: torch.Tensor  # fp32: [1, N] row-wise or [] tensor-wise
    bias: torch.Tensor | None  # [N] in out_dtype (bf16/fp16), added by the GEMM epilogue
    out_dtype: torch.dtype
    use_fast_accum: bool


def prepare_scaled_mm(
    x2d: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
    out_dtype: torch.dtype, act_scaling: str, fast_accum: bool = False,
) -> ScaledMMArgs:
    """Quantize the activation and lay out the operands the way `torch._scaled_mm` requires."""
    a, scale_a = _act_quantizer()(x2d, act_scaling)
    return scaled_mm_args(a, scale_a, w_fp8, w_scale, bias, out_dtype, act_scaling, fast_accum)


def scaled_mm_args(
    a: torch.Tensor, scale_a: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
    out_dtype: torch.dtype, act_scaling: str, fast_accum: bool = False,
) -> ScaledMMArgs:
    """The GEMM's operands for an activation already quantized (a [M, K] e4m3fn, scale_a [M, 1] or []). Every
    reshape, cast and copy below runs only when the operand is not already in shape: each costs host time."""
    m, n = a.shape[0], w_fp8.shape[0]
    if w_scale.dtype != torch.float32 or w_scale.device != a.device:
        w_scale = w_scale.to(device=a.device, dtype=torch.float32)
    if w_scale.numel() == 1 and scale_a.numel() == 1 and act_scaling == "per_tensor":
        # Tensor-wise x tensor-wise: cuBLAS, any of bf16/fp16/fp32 out.
        scale_a, scale_b = scale_a.reshape(()), w_scale.reshape(())
        gemm_dtype = out_dtype if out_dtype in _GEMM_OUT_DTYPES else torch.bfloat16
    else:
        # Row-wise x row-wise (torch takes no mixed pair): a per-tensor side is broadcast to a row.
        if scale_a.shape != (m, 1):   # the quantizers give [M, 1] per token already
            scale_a = scale_a.reshape(-1, 1).expand(m, 1).contiguous()
        scale_b = (w_scale.reshape(1, n) if w_scale.numel() == n
                   else w_scale.reshape(1, 1).expand(1, n).contiguous())
        gemm_dtype = torch.bfloat16  # the one output dtype every row-wise backend accepts
    gemm_bias = None
    if bias is not None and gemm_dtype != torch.float32:
        gemm_bias = bias if bias.dtype == gemm_dtype else bias.to(gemm_dtype)
    return ScaledMMArgs(a, w_fp8.t(), scale_a, scale_b, gemm_bias, gemm_dtype, fast_accum)


def run_scaled_mm(args: ScaledMMArgs) -> torch.Tensor:
    """The one call into the fp8 GEMM: out [M, N] = (a * scale_a) @ (b * scale_b) + bias."""
    return torch._scaled_mm(
        args.a, args.b, scale_a=args.scale_a, scale_b=args.scale_b, bias=args.bias,
        out_dtype=args.out_dtype, use_fast_accum=args.use_fast_accum,
    )


def linear_fp8(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
    out_dtype: torch.dtype, act_scaling: str = "per_token", fast_accum: bool | None = None,
) -> torch.Tensor:
    """fp8 GEMM for x [..., K]; a call the GEMM cannot take falls back to dequant (logged at debug).
    `fast_accum` None: the process-wide Fp8MatmulOptions.fast_accum."""
    if not _gemm_takes(x, w_fp8, w_scale):
        reason = scaled_mm_unsupported_reason(x, w_fp8, w_scale, act_scaling)
        if reason is not None:
            if not torch.compiler.is_compiling():   # a logging call would break a compiled graph
                _note_fallback(reason)
            return linear_dequant(x, w_fp8, w_scale, bias, out_dtype)
    x2d = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
    fast_accum = _options.fast_accum if fast_accum is None else fast_accum
    args = prepare_scaled_mm(x2d, w_fp8, w_scale, bias, out_dtype, act_scaling, fast_accum)
    out = run_scaled_mm(args)
    if bias is not None and args.bias is None:
        out = out + bias.to(out.dtype)
    if x.ndim != 2:
        out = out.reshape(*x.shape[:-1], w_fp8.shape[0])
    return out if out.dtype == out_dtype else out.to(out_dtype)


_PATHS: dict[str, Callable[..., torch.Tensor]] = {"fp8": linear_fp8, "dequant": linear_dequant}
FALLBACKS: dict[str, int] = {}   # why an fp8-mode layer took the dequant path -> calls (this process)
_FALLBACK_REASONS_LOGGED = 32


def _note_fallback(reason: str) -> None:
    """Count a dequant fallback of the fp8 path; each distinct reason is logged once (INFO), because a layer
    that silently dequantizes on every call costs about 1.4x its fp8 time and is otherwise invisible."""
    first = reason not in FALLBACKS
    FALLBACKS[reason] = FALLBACKS.get(reason, 0) + 1
    if first and len(FALLBACKS) <= _FALLBACK_REASONS_LOGGED:
        log.info("LowVRAM Kit: fp8 matmul not usable for a layer (%s); it is dequantized to bf16 per call", reason)


def fp8_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None, mode: str = "dequant", act_scaling: str = "per_token",
    fast_accum: bool | None = None,
) -> torch.Tensor:
    """x [..., in] -> [..., out] with an fp8 weight [out, in] and its scale ([out] or []).

    mode "fp8" runs `torch._scaled_mm` (resolve_compute() says when the device can); "dequant" runs
    F.linear on the weight cast to `out_dtype` (default: x's dtype, bf16 for other inputs). fast_accum (fp8
    mode): the GEMM's fast accumulation; None takes the process-wide Fp8MatmulOptions.fast_accum.
    >>> w = torch.tensor([[1.0, 2.0], [4.0, 8.0]]).to(torch.float8_e4m3fn)
    >>> fp8_linear(torch.ones(1, 2), w, torch.tensor([0.5, 0.25]))
    tensor([[1.5000, 3.0000]])
    """
    if mode not in _PATHS:
        raise ValueError(f"fp8_linear mode {mode!r} is not allowed; choose one of: {', '.join(_PATHS)}")
    out_dtype = _out_dtype(x, out_dtype)
    if mode == "fp8":
        return linear_fp8(x, w_fp8, w_scale, bias, out_dtype, act_scaling, fast_accum)
    return linear_dequant(x, w_fp8, w_scale, bias, out_dtype)
