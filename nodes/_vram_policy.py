"""VRAMGuard's decisions (no ComfyUI): the usable budget, what to change before sampling, what to change
after an out-of-memory error, and the words that tell the user.

    s = GuardSettings(budget_bytes=0, headroom_bytes=GiB // 2, policy="adapt", oom_retries=2)
    usable, notes = usable_bytes(s, Memory(free_bytes=..., reclaimable_bytes=..., total_bytes=...))
    d = decide(workload, placement_for, s, usable)   # d.verdict: fits | adapted | over | refused
    d.plan                                           # RunPlan(batch_chunk, weight_cap_bytes, tile_px)
    later, on an OOM: after_oom(d.plan, workload, placement_for) -> (RunPlan, what changed)

`placement_for(cap, images_per_run)` is the adapter's answer to "where would the weights be if they may use
at most `cap` device bytes (None: as the user set them up), in runs of that many latents (None: the whole
batch)": ComfyUI's partial loading, the block streamer's planner, or the CPU. Caps below the placement's
floor are never asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

from ._vram_estimate import RESERVE_OFFLOADED, Estimate, Placement, Workload, estimate, largest_tile_px

GiB = 1 << 30
POLICIES = ("adapt", "warn", "fail_fast")
MAX_RETRIES = 16
OOM_SHRINK = 0.7          # after an OOM the weights may keep 70% of the device bytes they had
# placement_for(cap, images_per_run): cap None = weights as set up; images_per_run None = the whole batch.
PlacementFor = Callable[[int | None, int | None], Placement]


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass(frozen=True)
class GuardSettings:
    """The node's widgets, validated once. budget_bytes 0 = what the card has free."""
    budget_bytes: int
    headroom_bytes: int
    policy: str = "adapt"
    oom_retries: int = 2
    report: bool = True

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"VRAMGuard policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.budget_bytes < 0:
            raise ValueError(f"VRAMGuard budget_gb is negative ({gib(self.budget_bytes)}); use 0 for what the "
                             "card has free, or the GiB this prompt may use")
        if self.headroom_bytes < 0:
            raise ValueError(f"VRAMGuard headroom_gb is negative ({gib(self.headroom_bytes)}); it is the margin "
                             "kept free below the budget: use 0.5 GiB or more (0 = no margin)")
        if not 0 <= self.oom_retries <= MAX_RETRIES:
            raise ValueError(f"VRAMGuard oom_retries={self.oom_retries}: use 0..{MAX_RETRIES}")

    def warnings(self) -> list[str]:
        if self.headroom_bytes == 0:
            return ["headroom is 0: nothing covers the estimate's error (about 15%) or other programs' growth; "
                    "0.5 GiB or more is safer"]
        return []


@dataclass(frozen=True)
class Memory:
    """What the adapter read. free: free on the device now (NVML counts every process); reclaimable:
    device bytes ComfyUI may free for this prompt (other models it holds, this model's loaded part)."""
    free_bytes: int
    reclaimable_bytes: int
    total_bytes: int
    source: str = "nvml"
    note: str = ""


def usable_bytes(s: GuardSettings, m: Memory) -> tuple[int, list[str]]:
    """Bytes this prompt may use (budget or what is free, minus headroom) and notes on bad budgets."""
    notes = s.warnings()
    card = m.free_bytes + m.reclaimable_bytes
    if s.budget_bytes == 0:
        base = card
    elif m.total_bytes and s.budget_bytes > m.total_bytes:
        notes.append(f"budget {gib(s.budget_bytes)} is larger than the device ({gib(m.total_bytes)} in all): "
                     f"using what it can give this prompt, {gib(card)}")
        base = card
    elif s.budget_bytes > card:
        used_elsewhere = max(0, m.total_bytes - card)
        notes.append(f"budget {gib(s.budget_bytes)} is more than this prompt can get ({gib(card)}; other "
                     f"processes and the CUDA context hold {gib(used_elsewhere)}): using {gib(card)}")
        base = card
    else:
        base = s.budget_bytes
    if m.note:
        notes.append(m.note)
    usable = base - s.headroom_bytes
    if usable <= 0:
        notes.append(f"headroom {gib(s.headroom_bytes)} leaves nothing of {gib(base)}: lower the headroom")
    return max(0, usable), notes


@dataclass(frozen=True)
class RunPlan:
    batch_chunk: int                   # images per sequential sampling run
    weight_cap_bytes: int | None = None  # device bytes the diffusion weights may hold (None: unchanged)
    tile_px: int = 0                   # ask the decoder to tile at this side (0: no request)

    def describe(self, batch: int) -> str:
        parts = []
        if self.weight_cap_bytes is not None:
            parts.append(f"diffusion weights capped at {gib(self.weight_cap_bytes)} on the device")
        if self.batch_chunk < batch:
            parts.append(f"batch of {batch} sampled as {math.ceil(batch / self.batch_chunk)} runs of "
                         f"<= {self.batch_chunk}")
        if self.tile_px:
            parts.append(f"tiled VAE decode at {self.tile_px} px")
        return "; ".join(parts) or "no change"


@dataclass(frozen=True)
class Decision:
    verdict: str                       # fits | adapted | over | refused
    plan: RunPlan
    estimate: Estimate                 # under `plan`
    first_estimate: Estimate           # as set up, before any change
    usable_bytes: int
    messages: tuple[str, ...] = ()
    suggestion: str = ""
    placement: Placement | None = field(default=None, compare=False)

    @property
    def text(self) -> str:
        return " ".join(self.messages)


def _sampling(w: Workload, p: Placement, chunk: int) -> int:
    return estimate(w, p, batch_chunk=chunk).sampling_bytes


def _non_weight(w: Workload, p: Placement, chunk: int) -> int:
    """Sampling bytes besides the weights if the weights go (or stay) offloaded."""
    e = estimate(w, p, batch_chunk=chunk)
    return e.sampling_bytes - p.device_weight_bytes - e.components["reserve"] + RESERVE_OFFLOADED


def _chunks(batch: int) -> list[int]:
    """Balanced run sizes, largest first (never 4 + 2 or 5 + 1 for a batch of 6).

    >>> _chunks(4), _chunks(6)
    ([4, 2, 1], [6, 3, 2, 1])
    """
    return sorted({math.ceil(batch / k) for k in range(1, batch + 1)}, reverse=True)


def search(w: Workload, placement_for: PlacementFor, usable: int, can_split: bool
           ) -> tuple[RunPlan, Placement, Estimate]:
    """The least disruptive plan predicted to fit `usable`: first the largest batch chunk that fits with
    the weights as they are (splitting a batch costs little once a GPU is saturated), then the largest
    chunk for which capping the weights (more offload, slower steps) fits. The decode tiles when its
    whole-image estimate does not fit. Returns the smallest plan when nothing fits.

    Each chunk is judged with the weights placed for runs of that chunk: ComfyUI sizes its loading by
    the run's batch, so smaller runs may keep more of the model on the device."""
    p0 = placement_for(None, None)
    chunks = _chunks(w.batch) if can_split else [w.batch]
    plan, placement = None, p0
    for chunk in chunks:
        p = placement_for(None, chunk)
        if _sampling(w, p, chunk) <= usable:
            plan, placement = RunPlan(chunk), p
            break
    if plan is None and p0.kind != "cpu":
        for chunk in chunks:
            cap = usable - _non_weight(w, p0, chunk)
            if cap >= p0.floor_bytes and cap < p0.device_weight_bytes:
                p = placement_for(cap, chunk)
                if _sampling(w, p, chunk) <= usable:
                    plan, placement = RunPlan(chunk, cap), p
                    break
    if plan is None:   # nothing fits: the smallest we can do
        floor = p0.floor_bytes if p0.kind != "cpu" and p0.floor_bytes < p0.device_weight_bytes else None
        plan = RunPlan(chunks[-1], floor)
        placement = placement_for(floor, chunks[-1])
    tile = 0
    if estimate(w, placement, plan.batch_chunk, decode_budget=usable).decode_bytes > usable:
        tile = largest_tile_px(w, usable)
        tile = tile if tile * tile < w.out_px else 0
    plan = replace(plan, tile_px=tile)
    return plan, placement, estimate(w, placement, plan.batch_chunk, tile, decode_budget=usable)


def decide(w: Workload, placement_for: PlacementFor, s: GuardSettings, usable: int,
           can_split: bool = True, notes: list[str] | tuple[str, ...] = ()) -> Decision:
    """Fits / adapted / over (warn, or adapt that could not fit) / refused (fail_fast), with messages."""
    p0 = placement_for(None, None)
    first = estimate(w, p0, decode_budget=usable)
    msgs = list(notes) + list(first.notes)
    head = f"{first.describe()} vs {gib(usable)} usable"
    if first.peak_bytes <= usable:
        return Decision("fits", RunPlan(w.batch), first, first, usable, tuple(msgs + [head + ": fits."]),
                        placement=p0)
    plan, placement, est = search(w, placement_for, usable, can_split)
    fits = est.peak_bytes <= usable
    change = plan.describe(w.batch)
    suggestion = (f"what would fit: {change} (predicted {gib(est.peak_bytes)})" if fits else
                  f"even {change} is predicted at {gib(est.peak_bytes)}: free {gib(est.peak_bytes - usable)} "
                  "more (close other programs, lower the resolution or batch), or raise the budget")
    if s.policy == "fail_fast":
        return Decision("refused", RunPlan(w.batch), first, first, usable, tuple(msgs + [
            f"refused before sampling: {head}. Change: {suggestion}."]), suggestion, p0)
    if s.policy == "warn":
        return Decision("over", RunPlan(w.batch), first, first, usable, tuple(msgs + [
            f"warning: {head}; running as set up. {suggestion[0].upper() + suggestion[1:]}."]), suggestion, p0)
    if fits:
        return Decision("adapted", plan, est, first, usable, tuple(msgs + [
            f"{head}: does not fit, so VRAMGuard changed: {change}; now predicted {gib(est.peak_bytes)}."]),
            suggestion, placement)
    return Decision("over", plan, est, first, usable, tuple(msgs + [
        f"{head}: does not fit; VRAMGuard applied what it could ({change}) and runs anyway; "
        f"{suggestion}. An out-of-memory error will be retried."]), suggestion, placement)


def after_oom(plan: RunPlan, w: Workload, placement_for: PlacementFor, can_split: bool = True
              ) -> tuple[RunPlan, str]:
    """The next, smaller plan after an out-of-memory error, and what changed.

    First the weights shrink to OOM_SHRINK of what they held (not below their floor), then the batch
    halves; when neither can change, the same plan runs again after memory was freed (an OOM can come
    from fragmentation or from another process's transient allocation)."""
    p = placement_for(plan.weight_cap_bytes, plan.batch_chunk)
    if p.kind != "cpu" and p.device_weight_bytes > p.floor_bytes:
        cap = max(p.floor_bytes, int(p.device_weight_bytes * OOM_SHRINK))
        return (replace(plan, weight_cap_bytes=cap),
                f"diffusion weights on the device {gib(p.device_weight_bytes)} -> {gib(cap)}")
    if can_split and plan.batch_chunk > 1:
        chunk = math.ceil(plan.batch_chunk / 2)
        return replace(plan, batch_chunk=chunk), f"batch runs of {plan.batch_chunk} -> {chunk} image(s)"
    return plan, "nothing left to shrink: same plan after freeing cached memory"
