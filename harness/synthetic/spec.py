"""TensorSpec: one tensor of a synthetic model file (key, shape, dtype, and how to fill it).

Spec builders (one module per model family) return an ordered list of these; nothing here allocates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

# How a tensor's values are drawn (see init.py). A table, so a new kind is one row there.
WEIGHT = "weight"        # Linear/Conv weight: N(0, 1/sqrt(fan_in)) plus a few outliers per output channel
BIAS = "bias"            # small: N(0, 0.02)
NORM = "norm"            # LayerNorm/RMSNorm/GroupNorm gain: 1 + N(0, 0.02)
NORM_ZC = "norm_zc"      # zero-centred RMSNorm gain (Gemma stores w, applies 1 + w): N(0, 0.02)
EMBEDDING = "embedding"  # token/position tables, pad tokens: N(0, 0.02)
SCALAR = "scalar"        # a lone learned scalar (CLIP logit_scale): ln(100) + tiny noise
BYTES = "bytes"          # raw payload (an embedded tokenizer model) supplied by TensorSpec.data
POSITION_IDS = "position_ids"  # int64 buffer [1, n] = arange(n) (old HF CLIP checkpoints save it)
LORA = "lora"            # LoRA down/up factor: N(0, 0.01), so up @ down stays a small change of the weight
KINDS = (WEIGHT, BIAS, NORM, NORM_ZC, EMBEDDING, SCALAR, BYTES, POSITION_IDS, LORA)

# safetensors' dtype names (the JSON header's "dtype" field).
ST_DTYPE = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.int64: "I64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
DTYPE_BY_NAME = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    # For BYTES: a callable returning the uint8 payload (called once, at write time).
    data: Callable[[], bytes] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TensorSpec {self.key}: unknown kind {self.kind!r}; use one of {KINDS}")
        if self.dtype not in ST_DTYPE:
            raise ValueError(f"TensorSpec {self.key}: dtype {self.dtype} has no safetensors name")
        if self.kind == BYTES and (self.data is None or self.dtype != torch.uint8 or len(self.shape) != 1):
            raise ValueError(f"TensorSpec {self.key}: a BYTES tensor is 1-D uint8 with a data callable")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def fan_in(self) -> int:
        # Linear [out, in] -> in; Conv [out, in, kh, kw] -> in*kh*kw; 1-D -> its length.
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else self.shape[0]


class SpecList:
    """Collects TensorSpecs in order with small helpers for the common layer shapes.

    >>> s = SpecList(torch.bfloat16)
    >>> s.linear("fc", 8, 4)
    >>> [(t.key, t.shape) for t in s.specs]
    [('fc.weight', (8, 4)), ('fc.bias', (8,))]
    """

    def __init__(self, dtype: torch.dtype, prefix: str = ""):
        self.dtype = dtype
        self.prefix = prefix
        self.specs: list[TensorSpec] = []

    def add(self, key: str, shape, kind: str, dtype: torch.dtype | None = None, data=None) -> None:
        self.specs.append(TensorSpec(self.prefix + key, tuple(int(d) for d in shape), dtype or self.dtype,
                                     kind, data))

    def linear(self, key: str, out_f: int, in_f: int, bias: bool = True) -> None:
        self.add(f"{key}.weight", (out_f, in_f), WEIGHT)
        if bias:
            self.add(f"{key}.bias", (out_f,), BIAS)

    def conv(self, key: str, out_c: int, in_c: int, k: int, bias: bool = True) -> None:
        self.add(f"{key}.weight", (out_c, in_c, k, k), WEIGHT)
        if bias:
            self.add(f"{key}.bias", (out_c,), BIAS)

    def norm(self, key: str, dim: int, bias: bool = True, name: str = "weight") -> None:
        self.add(f"{key}.{name}", (dim,), NORM)
        if bias:
            self.add(f"{key}.bias", (dim,), BIAS)

    def extend(self, specs: list[TensorSpec]) -> None:
        self.specs.extend(specs)


def count_params(specs: list[TensorSpec]) -> int:
    """Number of floating-point elements (buffers such as position_ids and tokenizer bytes excluded)."""
    return sum(s.numel for s in specs if s.dtype.is_floating_point)


def total_bytes(specs: list[TensorSpec]) -> int:
    return sum(s.nbytes for s in specs)


def with_prefix(specs: list[TensorSpec], prefix: str) -> list[TensorSpec]:
    return [TensorSpec(prefix + s.key, s.shape, s.dtype, s.kind, s.data) for s in specs]


def check_unique(specs: list[TensorSpec], where: str) -> list[TensorSpec]:
    seen = set()
    for s in specs:
        if s.key in seen:
            raise ValueError(f"{where}: duplicate key {s.key}")
        seen.add(s.key)
    return specs
