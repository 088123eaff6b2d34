"""Copy groups of host tensors into device buffers through two pinned staging buffers.

Why: a copy from pageable memory makes CUDA stage it through a small driver buffer, one tensor at a
time, with the Python thread blocked until it is staged. Attaching a streamer copies its resident groups
that way: Flux-dev's resident fp8 blocks took 0.69 s and T5-XXL's 0.95 s in the first prompt of the Flux
8 GB workflow, about 6 GB/s (`packing.py:fill` under `streamer._attach` in
bench/results/gpu_rounds_nvidia-h200_2026-11-22T0406.log). Here the CPU copies tensors into one pinned
window (torch spreads a large CPU copy over its threads) while the copy engine moves the other window
to the device at the pinned rate: the two overlap, and one device copy carries a whole window.

A window mirrors a byte range [w0, w1) of the destination layout (the same offsets, so alignment padding
travels along as don't-care bytes). Everything here runs on the caller's current stream, so work queued
after it on that stream sees the data; a window is refilled only after its previous device copy has run.

Example (without CUDA the pinning is refused and fill() is GroupLayout.fill;
tests/unit/test_offload_staging.py runs the windows on the CPU with the registration faked):
    >>> import torch
    >>> from offload.packing import GroupLayout, block_tensors
    >>> from offload.streams import backend_for
    >>> lin = torch.nn.Linear(4, 4)
    >>> layout = GroupLayout.build(list(enumerate(block_tensors([lin]))))
    >>> flat = torch.empty(layout.nbytes, dtype=torch.uint8)
    >>> with StagedUpload(backend_for(flat.device), window_bytes=1024) as up:
    ...     up.fill(layout, flat)
    >>> torch.equal(layout.entries[0].view(flat), lin.weight)
    True
"""

from __future__ import annotations

import torch

from .config import LOG, MiB
from .packing import GroupLayout, HostGroup, ValuesFor, _align, page_aligned_buffer

# Large enough that one device copy per window costs nothing beside its bytes (COPY_OVERHEAD_S is about
# 20 us; 64 MiB move in about 1.2 ms at the pinned rate), small enough that the two windows (pinned for the
# attach only) are a rounding error of host RAM. A tensor larger than a window widens both windows to it.
WINDOW_BYTES = 64 * MiB
# A group with a tensor larger than this is copied tensor by tensor (no window worth pinning for it).
MAX_WINDOW_BYTES = 512 * MiB


class _Window:
    def __init__(self, nbytes: int, backend) -> None:
        self.host = HostGroup(buffer=page_aligned_buffer(nbytes), views=(), pinned=False)
        self.error = self.host.pin()      # None when pinned
        self.copied = backend.new_event()   # recorded after this window's latest device copy
        self.used = False

    @property
    def buffer(self) -> torch.Tensor:
        return self.host.buffer

    @property
    def pinned(self) -> bool:
        return self.host.pinned

    def release(self) -> None:
        self.host.unpin()


class StagedUpload:
    """fill(layout, flat, values): what GroupLayout.fill does for a device `flat`, through pinned windows.

    Use as a context manager: on exit it waits for the last device copies, then unpins the windows. When
    pinning is refused (no CUDA runtime, locked-memory limit) fill() is the plain GroupLayout.fill."""

    def __init__(self, backend, window_bytes: int = WINDOW_BYTES) -> None:
        self.backend = backend
        self.window_bytes = window_bytes
        self._windows: list[_Window] = []
        self._current = 0
        self.staged_bytes = 0  # bytes that went through a window (the rest were copied directly)

    def __enter__(self) -> StagedUpload:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            for w in self._windows:
                if w.used:
                    w.copied.synchronize()   # the copy engine may still read the window
        finally:
            for w in self._windows:
                w.release()
            self._windows = []

    def _ready(self, largest: int) -> bool:
        """Two pinned windows of at least `largest` bytes; False when pinning is refused."""
        need = min(max(self.window_bytes, _align(largest)), MAX_WINDOW_BYTES)
        if self._windows and self._windows[0].buffer.nbytes >= need:
            return True
        self.close()
        self._windows = [_Window(need, self.backend) for _ in range(2)]
        if not all(w.pinned for w in self._windows):
            LOG.info("offload: staging windows could not be pinned (%s); copying tensor by tensor",
                     next(w.error for w in self._windows if not w.pinned))
            self.close()
            return False
        return True

    def fill(self, layout: GroupLayout, flat: torch.Tensor, values: ValuesFor | None = None) -> None:
        """Copy every tensor of `layout` into its place in `flat` (on the device); see GroupLayout.fill."""
        staged = [e for e in layout.entries if not self.copies_directly(e.tensor)]
        largest = max((e.nbytes for e in staged), default=0)
        if not staged or largest > MAX_WINDOW_BYTES or not self._ready(largest):
            layout.fill(flat, values)
            return
        window = None   # (w0, end): the destination byte range the current window holds so far
        with torch.no_grad():
            for entry in layout.entries:
                src = entry.source(values, flat.device)
                if self.copies_directly(src):
                    window = self._flush(flat, window)   # a direct copy must not be overwritten by a later flush
                    entry.view(flat).copy_(src)
                    continue
                room = self._windows[self._current].buffer.nbytes
                if window is not None and entry.offset + entry.nbytes - window[0] > room:
                    window = self._flush(flat, window)
                if window is None:
                    w = self._windows[self._current]
                    if w.used:
                        w.copied.synchronize()   # its previous device copy must be done before we overwrite it
                    window = (entry.offset, entry.offset)
                pos = entry.offset - window[0]   # the entry's place in the window mirrors its place in `flat`
                buf = self._windows[self._current].buffer[pos : pos + entry.nbytes]
                buf.view(entry.dtype).as_strided(entry.shape, entry.stride).copy_(src)
                window = (window[0], entry.offset + entry.nbytes)
            self._flush(flat, window)

    @staticmethod
    def copies_directly(src: torch.Tensor) -> bool:
        """True for a source that staging would not speed up: on a device (a merged LoRA) or already pinned."""
        return src.device.type != "cpu" or (torch.cuda.is_available() and src.is_pinned())

    def _flush(self, flat: torch.Tensor, window: tuple[int, int] | None) -> None:
        """Queue the device copy of the current window's bytes and switch to the other window."""
        if window is None:
            return None
        w0, end = window
        w = self._windows[self._current]
        flat[w0:end].copy_(w.buffer[: end - w0], non_blocking=self.backend.non_blocking)
        w.copied.record(self.backend.current_stream())
        w.used = True
        self.staged_bytes += end - w0
        self._current = 1 - self._current
        return None

