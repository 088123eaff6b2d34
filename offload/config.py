"""Settings of block streaming, validated once; constants measured on the anchor machine.

Example (run by tests/unit/test_offload_config.py):
    >>> cfg = OffloadConfig(budget_bytes=8 * GiB, chunk_size=0, prefetch=0)
    >>> cfg.budget_bytes // GiB, cfg.pin_memory
    (8, True)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

# One logger for everything under offload/; a fallback (pinned -> pageable) logs one warning here.
LOG = logging.getLogger("lowvram_kit.offload")

MiB = 1 << 20
GiB = 1 << 30

# Host -> device copy bandwidth on the anchor machine (H200, PCIe Gen5 x16; perf-anchors.md 1.1):
# 55.6 GB/s from pinned (page-locked) host memory, 10.7-11 GB/s from pageable memory, where the
# driver stages every copy through its own small pinned buffer and the copy blocks the host thread.
PINNED_H2D_BYTES_PER_S = 55.6e9
PAGEABLE_H2D_BYTES_PER_S = 11.0e9

# Deeper prefetch only helps when compute per group varies (perf-anchors.md 1.1, reading 2);
# beyond a few groups it only takes device memory away from the resident set.
MAX_PREFETCH = 8

# Device bytes kept out of every plan for what it cannot see (see OffloadConfig.margin_bytes); callers
# that check a budget before making a config (the adapter's floor check) use the same number.
DEFAULT_MARGIN_BYTES = 256 * MiB


def _check_int(name: str, value: object, minimum: int, what: str) -> None:
    # bool is an int subclass; True as a byte count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"OffloadConfig.{name} must be an int ({what}), got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"OffloadConfig.{name} must be >= {minimum} ({what}), got {value}")


@dataclass(frozen=True)
class OffloadConfig:
    """What the user grants block streaming.

    budget_bytes: device bytes that resident blocks, transfer slots and activations may use together.
    chunk_size: blocks per transfer group; 0 lets the planner choose.
    prefetch: groups copied ahead of the one computing (1 = double buffering); 0 lets the planner choose.
    pin_memory: page-lock the host copies of streamed blocks (about 5x faster copies); when the OS
        refuses, streaming falls back to pageable memory and logs one warning.
    margin_bytes: device bytes kept out of the plan for what it cannot see (allocator fragmentation,
        cuBLAS workspaces, the CUDA context's growth).
    """

    budget_bytes: int
    chunk_size: int = 0
    prefetch: int = 0
    pin_memory: bool = True
    margin_bytes: int = DEFAULT_MARGIN_BYTES

    def __post_init__(self) -> None:
        _check_int("budget_bytes", self.budget_bytes, 1, "device bytes")
        _check_int("chunk_size", self.chunk_size, 0, "blocks per transfer group, 0 = auto")
        _check_int("prefetch", self.prefetch, 0, "groups copied ahead, 0 = auto")
        _check_int("margin_bytes", self.margin_bytes, 0, "device bytes kept free")
        if self.prefetch > MAX_PREFETCH:
            raise ValueError(
                f"OffloadConfig.prefetch must be <= {MAX_PREFETCH}, got {self.prefetch}: a deeper "
                "prefetch only takes memory from the resident blocks; use 0 (auto) or 1-2"
            )
        if not isinstance(self.pin_memory, bool):
            raise TypeError(f"OffloadConfig.pin_memory must be a bool, got {self.pin_memory!r}")
        if self.margin_bytes >= self.budget_bytes:
            raise ValueError(
                f"OffloadConfig.margin_bytes ({self.margin_bytes}) must be smaller than budget_bytes "
                f"({self.budget_bytes}): nothing would be left for the blocks"
            )


def fmt_bytes(n: float) -> str:
    """1536 * MiB -> '1.50 GiB': for messages; exact byte counts are given next to it where they matter."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
