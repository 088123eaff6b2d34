"""One call for the adapter: measure the blocks, plan within the config's budget, attach.

Example (run by tests/unit/test_offload_streamer.py):
    >>> import torch
    >>> from offload import OffloadConfig
    >>> blocks = [torch.nn.Linear(64, 64) for _ in range(4)]
    >>> size = block_nbytes(blocks)[0]  # 64x64 fp32 weight + bias (padded to 256 bytes)
    >>> cfg = OffloadConfig(budget_bytes=3 * size, margin_bytes=0)
    >>> streamer = offload_blocks(blocks, cfg, torch.device("cpu"), activation_bytes=0)
    >>> streamer.plan.resident_blocks, streamer.device_bytes == 3 * size  # 1 resident + 2 slots
    ((0,), True)
    >>> streamer.detach()
"""

from __future__ import annotations

from .config import PINNED_H2D_BYTES_PER_S, OffloadConfig
from .packing import ValuesFor, block_nbytes
from .planner import BudgetTooSmall, Plan, plan
from .streamer import BlockStreamer, HostGroups


def plan_for(config: OffloadConfig, block_bytes: list[int], activation_bytes: int,
             seconds_per_block: list[float] | None = None,
             h2d_bytes_per_s: float = PINNED_H2D_BYTES_PER_S,
             preferred_activation_bytes: int | None = None) -> Plan:
    """plan() with the budget, chunk size, prefetch and margin of `config`.

    preferred_activation_bytes: room for activations the caller would put to use if the budget leaves it
    (ComfyUI runs cond and uncond as one batch only while 1.5x its estimate for both is free); the plan
    keeps that much free when some plan can, else it keeps `activation_bytes`, the least a call needs."""
    def with_room(room: int) -> Plan:
        return plan(block_bytes, config.budget_bytes, room, seconds_per_block, h2d_bytes_per_s,
                    chunk_size=config.chunk_size, prefetch=config.prefetch, margin_bytes=config.margin_bytes)

    if preferred_activation_bytes is not None and preferred_activation_bytes > activation_bytes:
        try:
            return with_room(preferred_activation_bytes)
        except BudgetTooSmall:
            pass   # the budget fits the least a call needs, or nothing: planned (or refused) below
    return with_room(activation_bytes)


def offload_blocks(blocks, config: OffloadConfig, device, activation_bytes: int,
                   seconds_per_block: list[float] | None = None,
                   h2d_bytes_per_s: float = PINNED_H2D_BYTES_PER_S,
                   resident_values: ValuesFor | None = None,
                   adopt_hosts: HostGroups | None = None,
                   preferred_activation_bytes: int | None = None) -> BlockStreamer:
    """Plan (refusing a budget below the floor before anything moves) and return an attached streamer.
    `resident_values`, `adopt_hosts`: see BlockStreamer (other values for the device copies of resident
    groups; host buffers a previous streamer of these blocks left pinned, unpinned here if unused);
    `preferred_activation_bytes`: see plan_for."""
    blocks = list(blocks)
    try:
        chosen = plan_for(config, block_nbytes(blocks), activation_bytes, seconds_per_block, h2d_bytes_per_s,
                          preferred_activation_bytes)
    except BaseException:
        for host in (adopt_hosts or {}).values():
            host.unpin()
        raise
    return BlockStreamer(blocks, chosen, device, pin_memory=config.pin_memory, resident_values=resident_values,
                         adopt_hosts=adopt_hosts).attach()
