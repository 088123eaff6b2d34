"""Block streaming in plain PyTorch: keep what fits of an ordered list of blocks on the device and
stream the rest from (pinned) host memory on a side stream. Knows nothing of model names or ComfyUI.

    streamer = offload_blocks(blocks, OffloadConfig(budget_bytes=...), device, activation_bytes=...)
    ...                       # run the model: the blocks' hooks onload and prefetch
    streamer.detach()         # everything back on host memory; device, pinned pages, stream freed
"""

from .api import offload_blocks, plan_for
from .config import DEFAULT_MARGIN_BYTES, GiB, LOG, MiB, PAGEABLE_H2D_BYTES_PER_S, PINNED_H2D_BYTES_PER_S, OffloadConfig
from .packing import ALIGN_BYTES, block_nbytes
from .planner import BudgetTooSmall, Floor, Plan, floor, plan
from .streamer import BlockStreamer

__all__ = [
    "ALIGN_BYTES",
    "BlockStreamer",
    "BudgetTooSmall",
    "DEFAULT_MARGIN_BYTES",
    "Floor",
    "GiB",
    "LOG",
    "MiB",
    "OffloadConfig",
    "PAGEABLE_H2D_BYTES_PER_S",
    "PINNED_H2D_BYTES_PER_S",
    "Plan",
    "block_nbytes",
    "floor",
    "offload_blocks",
    "plan",
    "plan_for",
]
