"""fp8 formats (a table) and the frozen configuration of a quantized load."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import torch


@dataclass(frozen=True)
class Fp8Format:
    name: str  # our name, used in configs and widgets: "e4m3fn"
    dtype: torch.dtype
    max_finite: float  # largest finite magnitude; a cast beyond it saturates or gives NaN
    comfy_name: str  # name in ComfyUI's `.comfy_quant` / `_quantization_metadata`
    safetensors_dtype: str  # dtype string in a safetensors header


# e4m3fn: 4 exponent bits, 3 mantissa bits, no inf; max 448, smallest normal 2**-6.
# e5m2: 5 exponent bits, 2 mantissa bits (coarser, wider range); max 57344.
FP8_FORMATS: dict[str, Fp8Format] = {
    f.name: f
    for f in (
        Fp8Format("e4m3fn", torch.float8_e4m3fn, 448.0, "float8_e4m3fn", "F8_E4M3"),
        Fp8Format("e5m2", torch.float8_e5m2, 57344.0, "float8_e5m2", "F8_E5M2"),
    )
}
_BY_DTYPE = {f.dtype: f for f in FP8_FORMATS.values()}
_BY_COMFY_NAME = {f.comfy_name: f for f in FP8_FORMATS.values()}

# Scale granularity of a weight [out, in]: one scale per output row, one per tensor, or none
# (plain cast with scale 1, what ComfyUI's "fp8_e4m3fn" weight dtype does).
GRANULARITIES = ("per_channel", "per_tensor", "none")
# How an fp8 Linear computes: fp8 tensor cores where present, or bf16 after dequantizing the weight.
COMPUTE_MODES = ("auto", "fp8", "dequant")
# Activation scale for the fp8 matmul: one per token (row of x) or one per call.
ACT_SCALINGS = ("per_token", "per_tensor")


def fp8_format(fmt: str | Fp8Format) -> Fp8Format:
    """The format named `fmt` (or `fmt` itself). Example: `fp8_format("e4m3fn").max_finite == 448.0`."""
    if isinstance(fmt, Fp8Format):
        return fmt
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8 format {fmt!r} is unknown; allowed: {', '.join(FP8_FORMATS)}")
    return FP8_FORMATS[fmt]


def format_of_dtype(dtype: torch.dtype) -> Fp8Format | None:
    """The fp8 format stored as `dtype`, or None when `dtype` is not an fp8 dtype we read."""
    return _BY_DTYPE.get(dtype)


def format_of_comfy_name(name: str) -> Fp8Format | None:
    """The fp8 format ComfyUI calls `name` ("float8_e4m3fn"), or None for other formats (nvfp4...)."""
    return _BY_COMFY_NAME.get(name)


def _check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"QuantConfig.{field}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize and compute. Validated once, here; code below trusts it.

    >>> QuantConfig().fmt, QuantConfig().granularity, QuantConfig().compute
    ('e4m3fn', 'per_channel', 'auto')
    >>> QuantConfig.from_json(QuantConfig(fmt="e5m2").to_json()).fmt
    'e5m2'
    """

    fmt: str = "e4m3fn"
    granularity: str = "per_channel"
    compute: str = "auto"
    act_scaling: str = "per_token"

    def __post_init__(self) -> None:
        _check_choice("fmt", self.fmt, tuple(FP8_FORMATS))
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("compute", self.compute, COMPUTE_MODES)
        _check_choice("act_scaling", self.act_scaling, ACT_SCALINGS)

    @property
    def format(self) -> Fp8Format:
        return FP8_FORMATS[self.fmt]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> "QuantConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"quantization config in {source} is not valid JSON ({e})") from e
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not set(data) <= known:
            raise ValueError(
                f"quantization config in {source} has unknown fields "
                f"{sorted(set(data) - known) if isinstance(data, dict) else data!r}; known: {sorted(known)}"
            )
        return cls(**data)
