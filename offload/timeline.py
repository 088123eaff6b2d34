"""Predict the time of one pass over the blocks with a copy engine, a compute stream and N slots.

The model is the streamer's protocol: streamed groups are copied one after another (one copy
engine), the copy of the n-th streamed load may start only when the slot it reuses is free, i.e.
when the compute of load n - slots has finished; a group computes when the previous group has
finished and its own copy has landed. Prefetch wraps around from the last group to the first
one of the next pass, so the first pass is cold and later passes are the steady state we report.

Example (run by tests/unit/test_offload_planner.py):
    >>> # 2 streamed groups of 1 GB at 10 GB/s, 0.05 s compute each: transfer-bound, 0.2 s per pass
    >>> round(simulate_pass([10**9, 10**9], [0.05, 0.05], [False, False], prefetch=1,
    ...                     h2d_bytes_per_s=1e10, copy_overhead_s=0.0), 6)
    0.2
"""

from __future__ import annotations


def simulate_pass(
    group_bytes: list[int],
    group_seconds: list[float],
    resident: list[bool],
    prefetch: int,
    h2d_bytes_per_s: float,
    copy_overhead_s: float,
    passes: int = 3,
) -> float:
    """Seconds of the last of `passes` passes (steady state)."""
    slots = prefetch + 1
    copy_end: list[float] = []  # by global load number n: when the n-th streamed copy lands
    load_compute_end: list[float] = []  # by n: when the compute that read load n ended
    compute_end = 0.0
    pass_ends = []
    for _ in range(passes):
        for g, nbytes in enumerate(group_bytes):
            start = compute_end
            if not resident[g]:
                n = len(copy_end)
                engine_free = copy_end[n - 1] if n else 0.0
                # the slot this copy reuses held load n - slots: it frees when that compute ends
                slot_free = load_compute_end[n - slots] if n >= slots else 0.0
                landed = max(engine_free, slot_free) + nbytes / h2d_bytes_per_s + copy_overhead_s
                copy_end.append(landed)
                start = max(start, landed)
            compute_end = start + group_seconds[g]
            if not resident[g]:
                load_compute_end.append(compute_end)
        pass_ends.append(compute_end)
    if passes == 1:
        return pass_ends[0]
    return pass_ends[-1] - pass_ends[-2]
