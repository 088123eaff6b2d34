"""GPU self-check of block streaming: `python -m offload.selfcheck` (add --help for sizes).

Builds a toy stack of Linear-heavy blocks (about 1 GB: bf16 blocks and blocks storing fc1 as fp8
with an fp32 per-row scale buffer), runs it fully resident, then streamed at several budgets, and
for each prints time per pass, torch.cuda.max_memory_allocated, the plan's prediction, and whether
the output is bit-identical (torch.equal) to the resident run. Exit status 1 on any mismatch or
on device/pinned memory left behind after detach. Without CUDA it runs a tiny version on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from .api import offload_blocks
from .config import MiB, OffloadConfig
from .packing import block_nbytes
from .planner import BudgetTooSmall, plan


class MlpBlock(nn.Module):
    """x + fc2(gelu(fc1(norm(x)))); with fp8=True fc1 is stored as e4m3 + fp32 scale per output row."""

    def __init__(self, dim: int, hidden: int, fp8: bool, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm = nn.LayerNorm(dim).to(torch.bfloat16)
        w1 = torch.randn(hidden, dim, generator=g) / dim**0.5  # (hidden, dim)
        self.fp8 = fp8
        if fp8:
            scale = w1.abs().amax(dim=1, keepdim=True) / 448.0  # e4m3 max is 448
            self.register_buffer("w1_fp8", (w1 / scale).to(torch.float8_e4m3fn))
            self.register_buffer("w1_scale", scale)  # (hidden, 1) fp32
        else:
            self.w1 = nn.Parameter(w1.to(torch.bfloat16))
        self.b1 = nn.Parameter(torch.zeros(hidden, dtype=torch.bfloat16))
        self.fc2 = nn.Linear(hidden, dim, dtype=torch.bfloat16)
        with torch.no_grad():
            self.fc2.weight.copy_(torch.randn(dim, hidden, generator=g) / hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (tokens, dim) bf16
        w1 = (self.w1_fp8.to(torch.bfloat16) * self.w1_scale.to(torch.bfloat16)) if self.fp8 else self.w1
        return x + self.fc2(F.gelu(F.linear(self.norm(x), w1, self.b1)))


def build(n: int, dim: int, hidden: int) -> list[nn.Module]:
    return [MlpBlock(dim, hidden, fp8=i % 2 == 1, seed=i) for i in range(n)]


def run(blocks, x):
    for block in blocks:
        x = block(x)
    return x


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(blocks, x, passes: int, device: torch.device) -> tuple[torch.Tensor, float]:
    y = run(blocks, x)  # warm-up (cuBLAS heuristics, first copies)
    sync(device)
    start = time.perf_counter()
    for _ in range(passes):
        y = run(blocks, x)
    sync(device)
    return y, (time.perf_counter() - start) / passes


def seconds_per_block(blocks, x, device: torch.device) -> list[float]:
    """Compute time of each resident block, CUDA-event timed (perf_counter on the CPU)."""
    if device.type != "cuda":
        marks = []
        for block in blocks:
            start = time.perf_counter()
            x = block(x)
            marks.append(time.perf_counter() - start)
        return marks
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in blocks]
    for (start, end), block in zip(events, blocks):
        start.record()
        x = block(x)
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / MiB if device.type == "cuda" else float("nan")


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m offload.selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--dim", type=int, default=2048 if cuda else 64)
    parser.add_argument("--hidden", type=int, default=6144 if cuda else 192)
    parser.add_argument("--tokens", type=int, default=8192 if cuda else 16)
    parser.add_argument("--passes", type=int, default=10 if cuda else 2)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False

    host_blocks = build(args.blocks, args.dim, args.hidden)
    sizes = block_nbytes(host_blocks)
    x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16).to(device)
    print(f"device: {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}")
    print(f"{args.blocks} blocks, {sum(sizes) / MiB:.0f} MiB packed, tokens {args.tokens}, dim {args.dim}")

    resident = copy.deepcopy(host_blocks)
    for block in resident:
        block.to(device)
    with torch.inference_mode():
        base_alloc = allocated(device)
        reset_peak(device)
        expected, resident_s = timed(resident, x, args.passes, device)
        activation = max(int(peak_mib(device) * MiB) - base_alloc, 0) if cuda else MiB
        seconds = seconds_per_block(resident, x, device)
    resident_peak = peak_mib(device)
    del resident
    sync(device)
    if cuda:
        torch.cuda.empty_cache()
    print(f"resident: {resident_s * 1e3:.2f} ms/pass, peak {resident_peak:.0f} MiB, "
          f"compute {sum(seconds) * 1e3:.2f} ms/pass by events, activations ~{activation / MiB:.0f} MiB")

    margin = 64 * MiB if cuda else MiB
    try:
        plan(sizes, 1, activation, margin_bytes=margin)
    except BudgetTooSmall as exc:
        floor = exc.smallest_budget_bytes
    def share(fraction: float) -> int:  # room for a fraction of the weights, plus what every plan needs
        return max(int(sum(sizes) * fraction) + activation + margin, floor)

    budgets = [("all resident", share(1.0), True), ("60%", share(0.6), True), ("30%", share(0.3), True),
               ("floor", floor, True), ("30% pageable", share(0.3), False)]
    failures = 0
    print(f"{'budget':>14} {'MiB':>7} {'ms/pass':>8} {'pred ms':>8} {'floor ms':>8} {'peak MiB':>9} "
          f"{'resident':>8} {'groups':>6} {'pf':>2} {'layout':>6} {'MiB/pass':>8} identical")
    for name, budget, pin in budgets:
        blocks = copy.deepcopy(host_blocks)
        before = allocated(device)
        cfg = OffloadConfig(budget_bytes=budget, margin_bytes=margin, pin_memory=pin)
        with torch.inference_mode():
            streamer = offload_blocks(blocks, cfg, device, activation_bytes=activation, seconds_per_block=seconds)
            try:
                reset_peak(device)
                y, streamed_s = timed(blocks, x, args.passes, device)
                copied_before = streamer.bytes_copied
                run(blocks, x)
                sync(device)
                per_pass = streamer.bytes_copied - copied_before
            finally:
                streamer.detach()
        p = streamer.plan
        same = torch.equal(y, expected)
        del y  # the output is the caller's, not a leak
        leaked = allocated(device) - before
        failures += (not same) + (leaked != 0) + (streamer.pinned_host_bytes != 0)
        print(f"{name:>14} {budget / MiB:7.0f} {streamed_s * 1e3:8.2f} {p.predicted_s * 1e3:8.2f} "
              f"{p.floor_s * 1e3:8.2f} {peak_mib(device):9.0f} {len(p.resident_blocks):8d} "
              f"{len(p.streamed_groups):6d} {p.prefetch:2d} {p.layout:>6} {per_pass / MiB:8.0f} "
              f"{'yes' if same else 'NO'}{'' if leaked == 0 else f'  LEAKED {leaked} bytes'}")
        if name == "30%":
            print("\n".join("    " + line for line in p.describe().splitlines()))
    print("OK" if failures == 0 else f"FAILED ({failures} problems)")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
