"""Deterministic, realistic-scale values for one TensorSpec.

Values depend only on (seed, key, device type): each tensor gets its own torch.Generator seeded from a
stable hash of the key, so one tensor can be regenerated alone and the file order does not matter.
CPU and CUDA generators give different streams (the file's metadata records which one was used).
"""
from __future__ import annotations

import hashlib
import math

import torch

from .spec import BIAS, BYTES, EMBEDDING, LORA, NORM, NORM_ZC, POSITION_IDS, SCALAR, WEIGHT, TensorSpec

# Real checkpoints have a few large-magnitude weights per output channel; an fp8 quantizer with
# per-tensor scales loses precision on them, so the synthetic files carry some on purpose.
OUTLIERS_PER_ROW = 2
OUTLIER_GAIN = (6.0, 12.0)   # times the row's std, random sign
SMALL_STD = 0.02
# LoRA factors: rank-32 up @ down then has entries of std sqrt(32) * 0.01^2 ~ 6e-4, a few percent of a
# 3840-wide weight's 1/sqrt(3840) ~ 0.016: the patched model still computes something close to the base.
LORA_STD = 0.01


def key_seed(seed: int, key: str) -> int:
    """Stable 63-bit seed for one tensor (Python's hash() is salted per process, so not that).

    >>> key_seed(0, "img_in.weight") == key_seed(0, "img_in.weight") != key_seed(1, "img_in.weight")
    True
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _weight(shape, gen, device) -> torch.Tensor:
    out = shape[0]
    fan_in = math.prod(shape[1:])
    std = 1.0 / math.sqrt(fan_in)
    w = torch.randn((out, fan_in), generator=gen, device=device, dtype=torch.float32).mul_(std)
    if fan_in >= 16:
        k = OUTLIERS_PER_ROW
        idx = torch.randint(0, fan_in, (out, k), generator=gen, device=device)
        lo, hi = OUTLIER_GAIN
        mag = torch.rand((out, k), generator=gen, device=device).mul_(hi - lo).add_(lo).mul_(std)
        sign = torch.randint(0, 2, (out, k), generator=gen, device=device).mul_(2).sub_(1)
        w.scatter_(1, idx, mag * sign)
    return w.view(shape)


def _normal(std, mean=0.0):
    def make(shape, gen, device):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std).add_(mean)
    return make


# kind -> maker(shape, generator, device) returning float32
_MAKERS = {
    WEIGHT: _weight,
    BIAS: _normal(SMALL_STD),
    NORM: _normal(SMALL_STD, 1.0),
    NORM_ZC: _normal(SMALL_STD),
    EMBEDDING: _normal(SMALL_STD),
    SCALAR: _normal(0.01, math.log(100.0)),
    LORA: _normal(LORA_STD),
}


def make_tensor(spec: TensorSpec, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor for `spec`, contiguous, in spec.dtype, on `device`.

    >>> from .spec import TensorSpec
    >>> t = make_tensor(TensorSpec("a.weight", (4, 32), torch.bfloat16, "weight"), seed=0)
    >>> t.shape, t.dtype, bool(t.abs().sum() > 0)
    (torch.Size([4, 32]), torch.bfloat16, True)
    """
    device = torch.device(device)
    if spec.kind == BYTES:
        payload = spec.data()
        if len(payload) != spec.shape[0]:
            raise ValueError(f"{spec.key}: payload is {len(payload)} bytes, spec says {spec.shape[0]}")
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    if spec.kind == POSITION_IDS:
        n = spec.shape[-1]
        return torch.arange(n, device=device, dtype=spec.dtype).expand(spec.shape).contiguous()
    gen = torch.Generator(device=device)
    gen.manual_seed(key_seed(seed, spec.key))
    shape = spec.shape if spec.shape else (1,)
    t = _MAKERS[spec.kind](shape, gen, device).to(spec.dtype)
    return t.reshape(spec.shape).contiguous()
