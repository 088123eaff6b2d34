"""Device transfer slots: `prefetch + 1` flat byte buffers, each the size of the largest streamed group.

Allocated once at attach and reused: a streamed group is copied into a free slot, computed from
views of it, and the slot is refilled with a later group only after the compute that read it has
finished (the slot's `done` event, recorded on the compute stream after the group's blocks).

Example (run by tests/unit/test_offload_streamer.py):
    >>> import torch
    >>> from offload.streams import backend_for
    >>> pool = SlotPool(2, 1024, torch.device("cpu"), backend_for(torch.device("cpu")))
    >>> pool.device_bytes, pool.victim(keep=()).index
    (2048, 0)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Slot:
    index: int
    buffer: torch.Tensor  # (slot_nbytes,) uint8 on the device
    copied: object  # event on the copy stream after the latest copy into this slot
    done: object  # event on the compute stream after the latest block that read this slot
    group: int | None = None  # group whose bytes are in (or on their way into) the slot
    waited: bool = False  # the compute stream already waits on `copied` for this occupant
    loaded_at: int = -1  # load order, for choosing the oldest occupant to replace
    views: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # group -> its views here


class SlotPool:
    def __init__(self, count: int, slot_nbytes: int, device: torch.device, backend) -> None:
        self.slot_nbytes = slot_nbytes
        self.slots = [
            Slot(
                index=k,
                buffer=torch.empty(slot_nbytes, dtype=torch.uint8, device=device),
                copied=backend.new_event(),
                done=backend.new_event(),
            )
            for k in range(count)
        ]
        self._by_group: dict[int, Slot] = {}
        self._loads = 0

    @property
    def device_bytes(self) -> int:
        return self.slot_nbytes * len(self.slots)

    def slot_of(self, group: int) -> Slot | None:
        return self._by_group.get(group)

    def victim(self, keep) -> Slot:
        """The slot to refill: an empty one, else the one loaded longest ago whose group is not in
        `keep` (the window being computed and prefetched). With blocks called in order this is
        round-robin over the slots."""
        candidates = [s for s in self.slots if s.group is None or s.group not in keep]
        if not candidates:
            raise RuntimeError(
                f"offload: all {len(self.slots)} slots hold groups of the current window {tuple(keep)}; "
                "the window must not be longer than the slot count (a bug in the streamer)"
            )
        return min(candidates, key=lambda s: (s.group is not None, s.loaded_at))

    def assign(self, slot: Slot, group: int) -> None:
        if slot.group is not None:
            self._by_group.pop(slot.group, None)
        slot.group = group
        slot.waited = False
        slot.loaded_at = self._loads
        self._loads += 1
        self._by_group[group] = slot

    def clear(self, slot: Slot) -> None:
        if slot.group is not None:
            self._by_group.pop(slot.group, None)
        slot.group = None
        slot.waited = False

    def close(self) -> None:
        """Drop every reference to device memory; the caller has ordered outstanding work first."""
        for slot in self.slots:
            slot.views.clear()
        self.slots = []
        self._by_group.clear()
