"""Choose which blocks stay resident, how blocks group into transfers, and how far to prefetch.

Physical floor of a pass: max(compute time, bytes not resident / host->device bandwidth). Every
streamed byte is paid every pass, so the planner keeps as many bytes resident as the budget
allows, after paying for `prefetch + 1` transfer slots of the largest streamed group.

Where the resident blocks sit (RESIDENT_LAYOUTS):
- "prefix": the first blocks of the call order. In the first pass the first streamed groups copy
  while the prefix computes; later passes prefetch across the pass boundary. Its weakness: during
  a long resident stretch the copy engine fills the `prefetch + 1` slots and then idles.
- "spread": resident blocks spaced evenly through the order, so the copy engine keeps working
  while each of them computes. It wins when transfer and compute are of similar size; it costs
  more (smaller) groups, hence more copies.
The search is exhaustive over (layout, chunk size, prefetch depth, number of resident blocks) and
scores each candidate with timeline.simulate_pass; ties go to more resident bytes, less device
memory, shallower prefetch, the prefix layout. A larger budget only adds candidates, so the
predicted time never grows with the budget.

Example (run by tests/unit/test_offload_planner.py):
    >>> MiB = 2**20
    >>> p = plan([100 * MiB] * 8, budget_bytes=500 * MiB, activation_bytes=0)
    >>> p.resident_blocks, p.layout, p.chunk_size, p.prefetch, p.device_bytes // MiB
    ((0, 1, 2), 'prefix', 1, 1, 500)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .config import MAX_PREFETCH, PINNED_H2D_BYTES_PER_S, fmt_bytes
from .timeline import simulate_pass

CHUNK_CANDIDATES = (1, 2, 3, 4, 6, 8)
PREFETCH_CANDIDATES = (1, 2, 3)
# Cost of one group copy besides its bytes (launch + DMA setup, the hooks around it): it is what
# makes many tiny groups slower than a few larger ones of the same bytes. About 20 us on an H200.
COPY_OVERHEAD_S = 20e-6



def _prefix(n: int, r: int) -> list[bool]:
    return [i < r for i in range(n)]


def _spread(n: int, r: int) -> list[bool]:
    # block i is resident when the running share r*i/n crosses an integer: r blocks, evenly spaced
    return [(i + 1) * r // n > i * r // n for i in range(n)]


# name -> (resident flag per block for n blocks with r resident, why it is there, for describe())
RESIDENT_LAYOUTS = {
    "prefix": (_prefix, "a prefix: its compute hides the first copies; later passes prefetch across the pass end"),
    "spread": (_spread, "spread through the order: the copy engine keeps working while each resident block "
                        "computes instead of idling with full slots during one long resident stretch"),
}


class BudgetTooSmall(ValueError):
    """budget_bytes is below the smallest budget that can run these blocks."""

    def __init__(self, message: str, smallest_budget_bytes: int) -> None:
        super().__init__(message)
        self.smallest_budget_bytes = smallest_budget_bytes


@dataclass(frozen=True)
class Plan:
    """Blocks partitioned, in call order, into groups that are either resident or streamed."""

    block_bytes: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]  # block indices, contiguous, in call order
    resident: tuple[bool, ...]  # per group
    prefetch: int  # groups copied ahead of the computing one; 0 when nothing is streamed
    chunk_size: int  # blocks per streamed group (the last may be shorter); 0 when nothing is streamed
    budget_bytes: int
    activation_bytes: int
    margin_bytes: int
    h2d_bytes_per_s: float
    compute_s: float | None  # per pass, from seconds_per_block; None when not measured
    predicted_s: float  # simulated seconds per pass in steady state (transfer only when compute unknown)
    layout: str = "prefix"  # where the resident blocks sit: a key of RESIDENT_LAYOUTS

    def __post_init__(self) -> None:
        flat = [i for group in self.groups for i in group]
        if flat != list(range(len(self.block_bytes))) or any(len(g) == 0 for g in self.groups):
            raise ValueError(f"Plan.groups must split blocks 0..{len(self.block_bytes) - 1} in order, got {self.groups}")
        if len(self.resident) != len(self.groups):
            raise ValueError(f"Plan.resident has {len(self.resident)} entries for {len(self.groups)} groups")
        if self.layout not in RESIDENT_LAYOUTS:
            raise ValueError(f"Plan.layout must be one of {sorted(RESIDENT_LAYOUTS)}, got {self.layout!r}")
        if not all(self.resident) and not 1 <= self.prefetch <= MAX_PREFETCH:
            raise ValueError(f"Plan.prefetch must be 1..{MAX_PREFETCH} when blocks are streamed, got {self.prefetch}")

    def group_bytes(self, g: int) -> int:
        return sum(self.block_bytes[i] for i in self.groups[g])

    @property
    def resident_blocks(self) -> tuple[int, ...]:
        return tuple(i for g, group in enumerate(self.groups) if self.resident[g] for i in group)

    @property
    def streamed_groups(self) -> tuple[int, ...]:
        return tuple(g for g in range(len(self.groups)) if not self.resident[g])

    @property
    def resident_bytes(self) -> int:
        return sum(self.block_bytes[i] for i in self.resident_blocks)

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied host -> device per pass."""
        return sum(self.group_bytes(g) for g in self.streamed_groups)

    @property
    def slot_bytes(self) -> int:
        return max((self.group_bytes(g) for g in self.streamed_groups), default=0)

    @property
    def slot_count(self) -> int:
        return self.prefetch + 1 if self.streamed_groups else 0

    @property
    def device_bytes(self) -> int:
        """Resident + slots + activations + margin: what this plan needs of the budget."""
        return (
            self.resident_bytes + self.slot_count * self.slot_bytes + self.activation_bytes + self.margin_bytes
        )

    @property
    def transfer_s(self) -> float:
        return self.streamed_bytes / self.h2d_bytes_per_s

    @property
    def floor_s(self) -> float:
        return max(self.compute_s or 0.0, self.transfer_s)

    def describe(self) -> str:
        n, total = len(self.block_bytes), sum(self.block_bytes)
        lines = [f"Block streaming plan for {n} blocks ({fmt_bytes(total)}), budget {fmt_bytes(self.budget_bytes)}:"]
        if not self.streamed_groups:
            lines.append(f"  resident: all blocks ({fmt_bytes(self.resident_bytes)})")
            lines.append("  streamed: nothing; every block fits, so no slots, no copies")
        else:
            if self.resident_blocks:
                lines.append(
                    f"  resident: blocks {_ranges(self.resident_blocks)} ({fmt_bytes(self.resident_bytes)}), "
                    f"{RESIDENT_LAYOUTS[self.layout][1]}"
                )
            streamed = tuple(i for g in self.streamed_groups for i in self.groups[g])
            lines.append(
                f"  streamed: blocks {_ranges(streamed)} in {len(self.streamed_groups)} groups of up to "
                f"{self.chunk_size} blocks, {fmt_bytes(self.streamed_bytes)} copied per pass"
            )
            lines.append(
                f"  prefetch: {self.prefetch} group(s) ahead on a side stream, {self.slot_count} slots of "
                f"{fmt_bytes(self.slot_bytes)}"
            )
        lines.append(
            f"  device: resident {fmt_bytes(self.resident_bytes)} + slots {fmt_bytes(self.slot_count * self.slot_bytes)}"
            f" + activations {fmt_bytes(self.activation_bytes)} + margin {fmt_bytes(self.margin_bytes)}"
            f" = {fmt_bytes(self.device_bytes)} of {fmt_bytes(self.budget_bytes)}"
        )
        compute = "unknown (not measured)" if self.compute_s is None else f"{self.compute_s:.4f} s"
        bound = "compute-bound" if (self.compute_s or 0.0) >= self.transfer_s else "transfer-bound"
        lines.append(
            f"  per pass: compute {compute}, transfer {self.transfer_s:.4f} s at "
            f"{self.h2d_bytes_per_s / 1e9:.1f} GB/s -> floor {self.floor_s:.4f} s ({bound}), "
            f"predicted {self.predicted_s:.4f} s"
        )
        return "\n".join(lines)


def _ranges(indices: tuple[int, ...]) -> str:
    """(0, 1, 2, 5, 7, 8) -> '0-2, 5, 7-8'"""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def _groups(flags: list[bool], chunk: int) -> list[tuple[int, ...]]:
    """A resident block is a group of its own; each run of streamed blocks is cut into chunks."""
    groups: list[tuple[int, ...]] = []
    run: list[int] = []
    for i, resident in enumerate(flags + [True]):  # a sentinel closes the last run
        if not resident:
            run.append(i)
            continue
        groups += [tuple(run[k : k + chunk]) for k in range(0, len(run), chunk)]
        run = []
        if i < len(flags):
            groups.append((i,))
    return groups


def _check_inputs(block_bytes, budget_bytes, activation_bytes, seconds_per_block, h2d_bytes_per_s,
                  chunk_size, prefetch, margin_bytes) -> None:
    if not block_bytes:
        raise ValueError("plan: block_bytes is empty; pass one packed size per block (offload.block_nbytes)")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in block_bytes):
        raise ValueError("plan: block_bytes must be non-negative ints (bytes per block)")
    for name, value in (("budget_bytes", budget_bytes), ("activation_bytes", activation_bytes),
                        ("margin_bytes", margin_bytes), ("chunk_size", chunk_size), ("prefetch", prefetch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"plan: {name} must be an int >= 0, got {value!r}")
    if prefetch > MAX_PREFETCH:
        raise ValueError(f"plan: prefetch must be <= {MAX_PREFETCH}, got {prefetch}")
    if seconds_per_block is not None and (
        len(seconds_per_block) != len(block_bytes) or any(s < 0 for s in seconds_per_block)
    ):
        raise ValueError(
            f"plan: seconds_per_block needs {len(block_bytes)} values >= 0 (one per block), got {seconds_per_block!r}"
        )
    if not h2d_bytes_per_s > 0:
        raise ValueError(f"plan: h2d_bytes_per_s must be > 0, got {h2d_bytes_per_s!r}")


class _Candidate(NamedTuple):
    """One arrangement the planner weighs: which blocks stay resident, how the rest group, how deep to prefetch."""

    rank: int  # index of the layout in RESIDENT_LAYOUTS (a tie-breaker)
    layout: str
    resident_count: int  # resident blocks
    resident_bytes: int
    chunk_size: int
    prefetch: int
    groups: tuple[tuple[int, ...], ...]
    resident: tuple[bool, ...]  # per group
    group_bytes: tuple[int, ...]  # per group
    slot_bytes: int  # the largest streamed group: every transfer slot has its size

    @property
    def weights_bytes(self) -> int:
        """Device bytes of the blocks: resident + (prefetch + 1) slots; activations and margin come on top."""
        return self.resident_bytes + (self.prefetch + 1) * self.slot_bytes


def _candidates(block_bytes, chunks, depths):
    """Every arrangement with at least one streamed block, in the planner's order (all resident is not one)."""
    n = len(block_bytes)
    for rank, (layout, (place, _)) in enumerate(RESIDENT_LAYOUTS.items()):
        for r in range(0 if rank == 0 else 1, n):  # r == 0 once: it is the same for every layout
            flags = place(n, r)
            resident_bytes = sum(b for b, f in zip(block_bytes, flags) if f)
            for chunk in chunks:
                groups = tuple(_groups(flags, chunk))
                resident = tuple(flags[g[0]] for g in groups)
                g_bytes = tuple(sum(block_bytes[i] for i in g) for g in groups)
                slot = max(b for b, res in zip(g_bytes, resident) if not res)
                for depth in depths:
                    yield _Candidate(rank, layout, r, resident_bytes, chunk, depth, groups, resident, g_bytes, slot)


@dataclass(frozen=True)
class Floor:
    """The smallest budget that runs a list of blocks, and what it is made of (for messages)."""

    budget_bytes: int  # resident + slots + activations + margin
    n_blocks: int
    resident_count: int  # resident blocks (n_blocks: all resident, nothing streamed)
    resident_bytes: int
    slot_count: int
    slot_bytes: int
    chunk_size: int  # blocks per streamed group (up to); 0 when nothing is streamed
    activation_bytes: int
    margin_bytes: int

    def describe(self) -> str:
        """'<bytes> bytes (<GiB>) = 2 transfer slots x 100.00 MiB (...) + activations ... + margin ...'"""
        parts = [f"{self.resident_count} resident block(s) {fmt_bytes(self.resident_bytes)}"] if self.resident_count else []
        if self.resident_count < self.n_blocks:
            parts.append(f"{self.slot_count} transfer slots x {fmt_bytes(self.slot_bytes)} (largest group of up to "
                         f"{self.chunk_size} block(s))")
        parts += [f"activations {fmt_bytes(self.activation_bytes)}", f"margin {fmt_bytes(self.margin_bytes)}"]
        return f"{self.budget_bytes} bytes ({fmt_bytes(self.budget_bytes)}) = {' + '.join(parts)}"


def floor(block_bytes: list[int], activation_bytes: int, *, chunk_size: int = 0, prefetch: int = 0,
          margin_bytes: int = 0) -> Floor:
    """The smallest budget with which plan() (same arguments) succeeds: below it, plan() raises BudgetTooSmall.

    Made from the same candidates plan() weighs, so the two never disagree; it does no timing, so it is
    cheap enough to call before sampling. It grows byte for byte with activation_bytes.

    >>> MiB = 2**20
    >>> f = floor([100 * MiB] * 8, activation_bytes=30 * MiB, margin_bytes=10 * MiB)
    >>> f.budget_bytes // MiB, f.slot_count, f.resident_count  # 2 slots of one block + activations + margin
    (240, 2, 0)
    >>> plan([100 * MiB] * 8, budget_bytes=f.budget_bytes, activation_bytes=30 * MiB, margin_bytes=10 * MiB).device_bytes // MiB
    240
    """
    _check_inputs(block_bytes, 0, activation_bytes, None, PINNED_H2D_BYTES_PER_S, chunk_size, prefetch, margin_bytes)
    n, total = len(block_bytes), sum(block_bytes)
    # With forced big chunks or deep prefetch, keeping everything resident can be the cheapest way to run.
    low = Floor(total + activation_bytes + margin_bytes, n, n, total, 0, 0, 0, activation_bytes, margin_bytes)
    chunks = (chunk_size,) if chunk_size else CHUNK_CANDIDATES
    depths = (prefetch,) if prefetch else PREFETCH_CANDIDATES
    for c in _candidates(block_bytes, chunks, depths):
        device = c.weights_bytes + activation_bytes + margin_bytes
        if device < low.budget_bytes:
            low = Floor(device, n, c.resident_count, c.resident_bytes, c.prefetch + 1, c.slot_bytes, c.chunk_size,
                        activation_bytes, margin_bytes)
    return low


def plan(
    block_bytes: list[int],
    budget_bytes: int,
    activation_bytes: int,
    seconds_per_block: list[float] | None = None,
    h2d_bytes_per_s: float = PINNED_H2D_BYTES_PER_S,
    *,
    chunk_size: int = 0,
    prefetch: int = 0,
    margin_bytes: int = 0,
) -> Plan:
    """The fastest predicted plan within `budget_bytes`; BudgetTooSmall names the smallest budget.

    block_bytes: packed bytes per block in call order (offload.block_nbytes(blocks)).
    activation_bytes: the caller's estimate of activations and workspaces at the peak.
    seconds_per_block: measured compute per block (None: assume transfer dominates).
    chunk_size / prefetch: 0 lets the planner choose; otherwise only that value is considered.
    """
    _check_inputs(block_bytes, budget_bytes, activation_bytes, seconds_per_block, h2d_bytes_per_s,
                  chunk_size, prefetch, margin_bytes)
    n = len(block_bytes)
    seconds = list(seconds_per_block) if seconds_per_block is not None else [0.0] * n
    common = dict(block_bytes=tuple(block_bytes), budget_bytes=budget_bytes, activation_bytes=activation_bytes,
                  margin_bytes=margin_bytes, h2d_bytes_per_s=float(h2d_bytes_per_s),
                  compute_s=None if seconds_per_block is None else float(sum(seconds)))

    if sum(block_bytes) + activation_bytes + margin_bytes <= budget_bytes:
        return Plan(groups=tuple((i,) for i in range(n)), resident=(True,) * n, prefetch=0, chunk_size=0,
                    predicted_s=float(sum(seconds)), **common)

    chunks = (chunk_size,) if chunk_size else CHUNK_CANDIDATES
    depths = (prefetch,) if prefetch else PREFETCH_CANDIDATES
    best = None  # (key, Plan kwargs)
    for c in _candidates(block_bytes, chunks, depths):
        if c.weights_bytes + activation_bytes + margin_bytes > budget_bytes:
            continue
        g_seconds = [sum(seconds[i] for i in g) for g in c.groups]
        t = simulate_pass(c.group_bytes, g_seconds, c.resident, c.prefetch, h2d_bytes_per_s, COPY_OVERHEAD_S)
        key = (round(t, 12), -c.resident_bytes, c.weights_bytes, c.prefetch, c.rank, c.chunk_size)
        if best is None or key < best[0]:
            best = (key, dict(groups=c.groups, resident=c.resident, prefetch=c.prefetch,
                              chunk_size=c.chunk_size, predicted_s=t, layout=c.layout))
    if best is None:
        low = floor(block_bytes, activation_bytes, chunk_size=chunk_size, prefetch=prefetch,
                    margin_bytes=margin_bytes)
        raise BudgetTooSmall(
            f"budget_bytes={budget_bytes} ({fmt_bytes(budget_bytes)}) is below the smallest budget that runs "
            f"these {n} blocks: {low.describe()}. "
            f"Raise budget_bytes to at least {low.budget_bytes}, or lower the resolution/batch (activations)"
            + (" or chunk_size/prefetch" if chunk_size or prefetch else "") + ".",
            smallest_budget_bytes=low.budget_bytes,
        )
    return Plan(**best[1], **common)
