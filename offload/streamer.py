"""BlockStreamer: run an ordered list of blocks within a device budget, streaming what is not resident.

Lifecycle:
    attach()  pack each streamed group into one host buffer (pinned when possible; or take over the
              buffer a previous streamer left for the same blocks, `adopt_hosts`; pinned on a helper
              thread while the next group packs), copy resident groups into one device arena (through
              pinned staging windows when pinning is on; optionally with other values,
              `resident_values`: a merged LoRA, computed once instead of on every call), allocate
              `prefetch + 1` slots, install block hooks, start copying the first groups. Any error
              inside attach undoes all of it.
    forward   the model calls its blocks in order; a block's pre-hook makes sure its group is in a
              slot (copying it now if prefetch missed it), makes the compute stream wait for that
              copy only, points the modules at the slot, and queues the copies of the next
              `prefetch` groups; the post-hook records "done reading this slot".
    detach()  waits for queued copies, removes the hooks, points every module back at host memory,
              unpins, frees slots, arena and stream. Safe twice, after a failed forward or attach.

Blocks must be invoked through their own `__call__` (hooks). A container that calls its children
directly (SDXL's TimestepEmbedSequential) should be passed as its children, or the caller invokes
before_block(i) / after_block(i) itself (install_hooks=False).

Example (run by tests/unit/test_offload_streamer.py):
    >>> import torch
    >>> from offload import block_nbytes, plan
    >>> blocks = [torch.nn.Linear(64, 64) for _ in range(4)]
    >>> p = plan(block_nbytes(blocks), budget_bytes=3 * block_nbytes(blocks)[0], activation_bytes=0)
    >>> x = torch.randn(2, 64)
    >>> with BlockStreamer(blocks, p, torch.device("cpu")) as streamer:
    ...     y = blocks[3](blocks[2](blocks[1](blocks[0](x))))
    ...     streamer.streamed_bytes_per_pass > 0
    True
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from .config import LOG, fmt_bytes
from .packing import GroupLayout, HostGroup, PinQueue, ValuesFor, block_tensors, pack_host, pin_cost_note
from .planner import Plan
from .slots import SlotPool
from .staging import StagedUpload
from .streams import backend_for


# Streamed groups' host buffers handed from one streamer to the next: block indices -> HostGroup.
HostGroups = dict[tuple[int, ...], HostGroup]


def _tensors_like(inference: bool) -> contextlib.ExitStack:
    """Buffers and views made here are the same kind as the model's own tensors.

    A module re-pointed by `param.data = view` keeps working only if the view is of the param's kind:
    a normal tensor put into a Parameter made under torch.inference_mode() (ComfyUI loads models that
    way) leaves a tensor without a version counter, and the next view of it (F.linear's weight.t())
    fails with "Inference tensors do not track version counter"; inference tensors put into a normal
    model would make it unusable in any later computation that autograd records.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(inference))
    stack.enter_context(torch.no_grad())
    return stack


def _holds(layout: GroupLayout, host: HostGroup) -> bool:
    """True when the group's tensors are `host`'s views now: its buffer is what the modules hold (a buffer
    left by an older streamer, since re-pointed elsewhere, is not adopted)."""
    return host.buffer.nbytes == layout.nbytes and len(host.views) == len(layout.entries) and all(
        e.tensor.data_ptr() == v.data_ptr() for e, v in zip(layout.entries, host.views))


class BlockStreamer:
    def __init__(self, blocks, plan: Plan, device, *, pin_memory: bool = True,
                 install_hooks: bool = True, trace: bool = False, resident_values: ValuesFor | None = None,
                 adopt_hosts: HostGroups | None = None) -> None:
        self.blocks: list[nn.Module] = list(blocks)
        if len(self.blocks) != len(plan.block_bytes):
            raise ValueError(f"offload: the plan is for {len(plan.block_bytes)} blocks, got {len(self.blocks)}")
        self.plan = plan
        self.device = torch.device(device)
        self.backend = backend_for(self.device)  # no CUDA call here
        self.pin_memory = pin_memory and self.device.type == "cuda"  # pinning only speeds up H2D copies
        self.install_hooks = install_hooks
        # The device copy of a resident group may hold other values than the host tensors (which stay as
        # they are and come back on detach); streamed groups always carry the tensors' own bytes.
        self.resident_values = resident_values
        # Host buffers a previous streamer of these blocks handed over (detach(keep_hosts=True)): a group
        # of the same blocks streams from its buffer as it is, already packed and pinned; the rest are
        # unpinned once this attach has read them.
        self._adopt = dict(adopt_hosts or {})
        self.trace: list[tuple[str, int, int]] | None = [] if trace else None
        # Made under torch.inference_mode() (as ComfyUI loads models)? Then so must be our buffers.
        self._inference = any(t.is_inference() for b in self.blocks for t in b.parameters())
        self._group_of = [g for g, group in enumerate(plan.groups) for _ in group]
        self._first_of_group = {group[0] for group in plan.groups}
        self._windows = self._make_windows()
        self._reset()

    def _make_windows(self) -> list[tuple[int, ...]]:
        """Per group: the streamed groups that must be in slots when it starts, in call order: the
        group itself (if streamed) and the next `prefetch`, wrapping to the start of the next pass."""
        streamed = list(self.plan.streamed_groups)
        windows = []
        for g in range(len(self.plan.groups)):
            after = [k for k, s in enumerate(streamed) if s >= g]
            k0 = after[0] if after else 0
            size = min(self.plan.slot_count, len(streamed))
            windows.append(tuple(streamed[(k0 + j) % len(streamed)] for j in range(size)))
        return windows

    def _reset(self) -> None:
        self.attached = False
        self._layouts: list[GroupLayout] = []
        self._hosts: dict[int, object] = {}  # streamed group -> HostGroup
        self._originals: dict[int, tuple[torch.Tensor, ...]] = {}  # resident group -> its old .data
        self._arena: torch.Tensor | None = None
        self._slots: SlotPool | None = None
        self._copy_stream = None
        self._pointed: dict[int, int] = {}  # streamed group -> slot index its modules point at
        self._hooks: list = []
        self.copies = 0
        self.bytes_copied = 0
        self.adopted_groups = 0  # streamed groups taken over from the previous streamer's host buffers

    def is_resident(self, block: int) -> bool:
        """True when block `block` stays on the device for the whole pass (its group is in the arena)."""
        return bool(self.plan.resident[self._group_of[block]])

    # ---- memory accounting (what ComfyUI's model_size / partial loading need) --------------------

    @property
    def resident_device_bytes(self) -> int:
        return 0 if self._arena is None else self._arena.nbytes

    @property
    def slot_device_bytes(self) -> int:
        return 0 if self._slots is None else self._slots.device_bytes

    @property
    def device_bytes(self) -> int:
        """Device memory this streamer holds (resident arena + slots); activations are the model's."""
        return self.resident_device_bytes + self.slot_device_bytes

    @property
    def streamed_bytes_per_pass(self) -> int:
        return sum(self._layouts[g].nbytes for g in self._hosts)

    @property
    def pinned_host_bytes(self) -> int:
        return sum(h.pinned_nbytes for h in self._hosts.values())

    # ---- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> BlockStreamer:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> BlockStreamer:
        if self.attached:
            return self
        try:
            with _tensors_like(self._inference):
                self._attach()
        except BaseException:
            self.detach()  # leave nothing allocated or re-pointed
            raise
        return self

    def _attach(self) -> None:
        self.attached = True  # from here detach() has something to undo
        plan = self.plan
        tensors = block_tensors(self.blocks)  # refuses tensors shared between blocks
        self._layouts = [GroupLayout.build([(i, tensors[i]) for i in group]) for group in plan.groups]
        for g, group in enumerate(plan.groups):
            if self._layouts[g].nbytes != plan.group_bytes(g):
                raise ValueError(
                    f"offload: blocks {group[0]}-{group[-1]} pack to {self._layouts[g].nbytes} bytes but the plan "
                    f"says {plan.group_bytes(g)}; make the plan from offload.block_nbytes(blocks)"
                )
        resident = [g for g in range(len(plan.groups)) if plan.resident[g]]
        streamed = list(plan.streamed_groups)
        # Device memory first: an out-of-memory here costs nothing, after the slow host packing it would.
        resident_nbytes = sum(self._layouts[g].nbytes for g in resident)
        if resident_nbytes:
            self._arena = torch.empty(resident_nbytes, dtype=torch.uint8, device=self.device)
        if streamed:
            slot_nbytes = max(self._layouts[g].nbytes for g in streamed)
            self._slots = SlotPool(plan.slot_count, slot_nbytes, self.device, self.backend)
        offset = 0
        # Resident groups go up through two pinned windows when pinning is on (from pageable memory CUDA
        # copies tensor by tensor, about 6 GB/s on the H200; see offload.staging); else tensor by tensor.
        with contextlib.ExitStack() as staging:
            fill = GroupLayout.fill
            if self.pin_memory and resident:
                fill = staging.enter_context(StagedUpload(self.backend)).fill
            for g in resident:
                layout = self._layouts[g]
                flat = self._arena[offset : offset + layout.nbytes]
                offset += layout.nbytes
                self._originals[g] = tuple(e.tensor.data for e in layout.entries)
                fill(layout, flat, self.resident_values)
                layout.point_to(layout.views(flat))
        pin = self.pin_memory
        adopted, self._adopt = self._adopt, {}
        try:
            self._pack_streamed(streamed, adopted, pin)
        finally:
            for host in adopted.values():   # not taken over: its blocks are resident or regrouped now
                host.unpin()
        if self.install_hooks:
            for i, block in enumerate(self.blocks):
                self._hooks.append(block.register_forward_pre_hook(
                    functools.partial(self._pre_hook, i), prepend=True))
                if not plan.resident[self._group_of[i]]:
                    self._hooks.append(block.register_forward_hook(functools.partial(self._post_hook, i)))
        if streamed:
            # The slots came from the caching allocator on the compute stream, which may hand out memory
            # that kernels still queued there are reading; the copy stream must start after them.
            self._stream().wait_stream(self.backend.current_stream())
            self._prefetch(self._windows[0])

    def _pack_streamed(self, streamed: list[int], adopted: HostGroups, pin: bool) -> None:
        """A host buffer per streamed group: adopted from the last streamer when it holds the same blocks
        (re-pinned if it was left unpinned), else packed now; pinning runs on a helper thread (PinQueue)
        while the next group packs, and this returns once every group is pinned (or refused)."""
        pins = PinQueue() if pin else None
        try:
            for g in streamed:
                key = tuple(self.plan.groups[g])
                host = adopted.get(key)
                if host is not None and _holds(self._layouts[g], host):
                    self._hosts[g] = adopted.pop(key)   # the modules already point at its views: no packing
                    self.adopted_groups += 1
                    if host.pinned and not pin:
                        host.unpin()
                    elif pin and not host.pinned:
                        pins.submit(host)               # a buffer left unpinned while the model was unloaded
                else:
                    host = self._hosts[g] = pack_host(self._layouts[g], pin=False)
                    if pin:
                        pins.submit(host)
        finally:
            refused = pins.close() if pins is not None else None
        if refused is not None:
            rest = sum(h.buffer.nbytes for h in self._hosts.values() if not h.pinned)
            LOG.warning(
                "offload: could not pin %s of host memory (%s); streaming it from pageable memory: %s. "
                "Free host RAM or lower what is streamed (raise budget_bytes) to get pinned speed back.",
                fmt_bytes(rest), refused, pin_cost_note(),
            )

    def detach(self, keep_hosts: bool = False, unpin_kept: bool = False) -> HostGroups | None:
        """Put every module back on host memory and free device memory, pinned pages and the stream.

        keep_hosts: leave the streamed groups' host buffers pinned and return them, keyed by their block
        indices, for the next streamer of the same blocks (`adopt_hosts`), which then packs and pins
        only what changed: re-planning after the first step costs a fraction of a fresh attach. Returns
        None without keep_hosts. unpin_kept: unpin them all the same (a model being unloaded must not
        hold page-locked memory); a later streamer re-pins them without packing again."""
        kept: HostGroups = {}
        for host in self._adopt.values():   # handed to this streamer but never taken over
            host.unpin()
        self._adopt = {}
        if not self.attached:
            return kept if keep_hosts else None
        try:
            if self._copy_stream is not None or self._arena is not None or self._slots is not None:
                # Copies still reading pinned pages, and kernels (on whatever stream the model ran) still
                # reading slots or the arena, must finish before we unpin and free: the pages would go
                # back to the OS and the caching allocator would hand the device memory out again.
                self.backend.synchronize()
        finally:
            for handle in self._hooks:
                handle.remove()
            with _tensors_like(self._inference):
                for g, host in self._hosts.items():
                    self._layouts[g].point_to(host.views)
                    if keep_hosts:
                        kept[tuple(self.plan.groups[g])] = host
                    if unpin_kept or not keep_hosts:
                        host.unpin()
                for g, originals in self._originals.items():
                    self._layouts[g].point_to(originals)
            if self._slots is not None:
                self._slots.close()
            self._reset()
        return kept if keep_hosts else None

    # ---- per block ------------------------------------------------------------------------------

    def _pre_hook(self, i: int, module, args) -> None:
        self.before_block(i)

    def _post_hook(self, i: int, module, args, output) -> None:
        self.after_block(i)

    def before_block(self, i: int) -> None:
        """Call before block i computes: its weights are on the device when this returns (in stream order)."""
        g = self._group_of[i]
        if not self._hosts:
            return  # nothing streamed
        if i in self._first_of_group:
            self._prefetch(self._windows[g])
        if self.plan.resident[g]:
            return
        slot = self._slots.slot_of(g)
        if slot is None:  # called out of order (e.g. a skipped block): load it now
            self._prefetch(self._windows[g])
            slot = self._slots.slot_of(g)
        if not slot.waited:
            # Without this wait the compute stream would read the slot while the copy engine is still
            # writing it (garbage weights, no error). It waits for this group's copy only.
            self.backend.current_stream().wait_event(slot.copied)
            slot.waited = True
            self._log("wait", g, slot.index)
        if self._pointed.get(g) != slot.index:
            views = slot.views.get(g)
            if views is None:
                with _tensors_like(self._inference):
                    views = slot.views[g] = self._layouts[g].views(slot.buffer)
            self._layouts[g].point_to(views)
            self._pointed[g] = slot.index

    def after_block(self, i: int) -> None:
        """Call after block i computed: its slot may be refilled once the queued compute has run."""
        g = self._group_of[i]
        if not self._hosts or self.plan.resident[g]:
            return
        slot = self._slots.slot_of(g)
        if slot is not None:
            slot.done.record(self.backend.current_stream())
            self._log("done", g, slot.index)

    # ---- copies ---------------------------------------------------------------------------------

    def _stream(self):
        if self._copy_stream is None:
            self._copy_stream = self.backend.new_stream()  # lazily: the one side stream
        return self._copy_stream

    def _prefetch(self, window: tuple[int, ...]) -> None:
        for g in window:
            if self._slots.slot_of(g) is None:
                self._copy_into(self._slots.victim(keep=window), g)

    def _copy_into(self, slot, g: int) -> None:
        old = slot.group
        if old is not None:
            # The old group's modules stop pointing at bytes that are about to change.
            if self._pointed.get(old) == slot.index:
                self._layouts[old].point_to(self._hosts[old].views)
                del self._pointed[old]
            self._log("evict", old, slot.index)
        stream = self._stream()
        # Without this wait the copy could overwrite the slot while queued kernels of its previous
        # group still read it. (An event never recorded makes the wait a no-op.)
        stream.wait_event(slot.done)
        host = self._hosts[g]
        with self.backend.on_stream(stream):
            # Asynchronous only from pinned pages; from pageable memory CUDA copies synchronously anyway.
            slot.buffer[: host.buffer.nbytes].copy_(host.buffer, non_blocking=host.pinned and self.backend.non_blocking)
            slot.copied.record(stream)
        self._slots.assign(slot, g)
        self.copies += 1
        self.bytes_copied += host.buffer.nbytes
        self._log("copy", g, slot.index)

    def _log(self, what: str, group: int, slot: int) -> None:
        if self.trace is not None:
            self.trace.append((what, group, slot))
