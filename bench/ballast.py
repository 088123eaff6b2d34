"""Simulate a card of `budget_bytes` on a larger GPU: fill everything else with one uint8 tensor.

Every tool in the process (ComfyUI's planner included) reads `torch.cuda.mem_get_info()`, so after
`Ballast(12 * GiB)` they all see a 12 GiB card. `set_per_process_memory_fraction` is not used on purpose:
ComfyUI cannot see that limit and would over-commit (see ../shared/guide/benchmarking.md).

    with Ballast(12 * GiB) as b:       # b.free_bytes is about 12 GiB (allocator rounds to 2 MiB)
        run_workload()
"""
from __future__ import annotations

import torch

GiB = 1024 ** 3


class BudgetTooLargeError(ValueError):
    pass


class Ballast:
    """Context manager; `budget_bytes=None` means unlimited (allocates nothing)."""

    def __init__(self, budget_bytes: int | None, device: str | torch.device = "cuda"):
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"Ballast budget_bytes must be > 0 or None (unlimited), got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        self.tensor: torch.Tensor | None = None
        self.ballast_bytes = 0
        self.free_bytes: int | None = None    # what mem_get_info reports once the ballast is in place

    def __enter__(self) -> "Ballast":
        # Cached-but-unused blocks count as "free" to ComfyUI (it adds reserved - active) but not to
        # mem_get_info: give them back first so the two agree.
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        if self.budget_bytes is not None:
            if free < self.budget_bytes:
                raise BudgetTooLargeError(
                    f"budget {self.budget_bytes / GiB:.2f} GiB exceeds the {free / GiB:.2f} GiB free on "
                    f"{torch.cuda.get_device_name(self.device)} ({total / GiB:.1f} GiB total); "
                    "pick a smaller budget or 'unlimited'")
            self.ballast_bytes = free - self.budget_bytes
            self.tensor = torch.empty(self.ballast_bytes, dtype=torch.uint8, device=self.device)
            torch.cuda.synchronize(self.device)
        self.free_bytes = torch.cuda.mem_get_info(self.device)[0]
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.tensor is not None:
            self.tensor = None
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()   # hand the block back to the driver, not just to torch's cache


def parse_budgets(text: str) -> list[float | None]:
    """'unlimited,24,12.5' -> [None, 24.0, 12.5] (GiB; None = unlimited), in the order given.

    >>> parse_budgets("unlimited, 24,4")
    [None, 24.0, 4.0]
    """
    out: list[float | None] = []
    for part in text.split(","):
        p = part.strip().lower()
        if p in ("unlimited", "none", "inf"):
            out.append(None)
            continue
        try:
            gib = float(p)
        except ValueError:
            raise ValueError(f"budget {part!r} is neither a number of GiB nor 'unlimited'") from None
        if gib <= 0:
            raise ValueError(f"budget {part!r} must be > 0 GiB")
        out.append(gib)
    return out


def budget_label(gib: float | None) -> str:
    return "unlimited" if gib is None else f"{gib:g}"
