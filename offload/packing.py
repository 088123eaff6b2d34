"""Pack a group of blocks' tensors (parameters AND buffers, any dtype) into one flat byte buffer.

A group's layout gives every tensor a byte offset in one uint8 buffer; the same layout makes views
of the host buffer, of a device transfer slot, or of the resident device arena, so moving a group
is ONE copy of contiguous bytes whatever mix of dtypes it holds (fp8 weights + fp32 scales + bf16
biases). Modules are re-pointed by assigning `tensor.data = view`: the Parameter/buffer objects
stay the same (tied references, hooks and optimizers keep working) and their old storage is freed
when nothing else holds it, so after packing host RAM holds one copy of the weights.

Example (run by tests/unit/test_offload_packing.py):
    >>> import torch
    >>> lin = torch.nn.Linear(4, 4)
    >>> layout = GroupLayout.build(list(enumerate(block_tensors([lin]))))
    >>> host = pack_host(layout, pin=False)
    >>> host.buffer.nbytes == layout.nbytes == 2 * ALIGN_BYTES
    True
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from .config import LOG, PAGEABLE_H2D_BYTES_PER_S, PINNED_H2D_BYTES_PER_S, fmt_bytes

# values(tensor, device) -> values to put in the tensor's place on `device` instead of its own, or None.
ValuesFor = Callable[[torch.Tensor, torch.device], "torch.Tensor | None"]

# Every tensor starts on a 256-byte boundary: the CUDA caching allocator gives every tensor that
# alignment, and kernels (vectorised loads, cuBLAS, fp8 `_scaled_mm`, which needs 16) may pick a
# different, or no, algorithm on a less aligned pointer: outputs must stay bit-identical.
ALIGN_BYTES = 256

# cudaHostRegisterPortable: the pages count as pinned for every CUDA context, not only this one.
_HOST_REGISTER_PORTABLE = 1
# CUDA pins whole pages and refuses a range that overlaps one already registered; host buffers start
# on a page and register whole pages of their own, so two small buffers never share a pinned page.
PAGE_BYTES = mmap.PAGESIZE


def _align(n: int, to: int = ALIGN_BYTES) -> int:
    return (n + to - 1) // to * to


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _dense_stride(t: torch.Tensor) -> tuple[int, ...]:
    """The tensor's own strides when its elements exactly fill numel slots (e.g. a transposed weight),
    so a matmul sees the same memory order as before; contiguous strides otherwise (expanded views)."""
    shape, stride = tuple(t.shape), tuple(t.stride())
    if t.is_contiguous() or t.numel() == 0:
        return _contiguous_stride(shape)
    span = 1 + sum((size - 1) * st for size, st in zip(shape, stride))
    if span == t.numel() and all(st > 0 for st in stride):
        return stride
    return _contiguous_stride(shape)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a group: where it lives in the group's flat buffer."""

    name: str  # "block 3: attn.qkv.weight", for error messages
    tensor: torch.Tensor  # the Parameter / buffer object whose .data gets re-pointed
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # bytes from the start of the group buffer, a multiple of ALIGN_BYTES
    nbytes: int

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This tensor as a view of `flat` (a uint8 buffer of at least the group's nbytes)."""
        raw = flat[self.offset : self.offset + self.nbytes].view(self.dtype)  # (numel,)
        return raw.as_strided(self.shape, self.stride)

    def source(self, values: ValuesFor | None, device: torch.device) -> torch.Tensor:
        """What to copy into this tensor's place on `device`: `values`' replacement (checked) or the tensor."""
        replaced = None if values is None else values(self.tensor, device)
        if replaced is None:
            return self.tensor
        if tuple(replaced.shape) != self.shape or replaced.dtype != self.dtype:
            raise ValueError(
                f"offload: the values given for {self.name} are {replaced.dtype} {list(replaced.shape)}, "
                f"but the tensor is {self.dtype} {list(self.shape)}; they must match to share its place"
            )
        return replaced


def _check_tensor(name: str, t: torch.Tensor) -> None:
    # A subclass (GGUF's quantized tensors, torchao's) carries state that a byte copy would lose.
    if type(t) not in (torch.Tensor, nn.Parameter):
        raise TypeError(
            f"offload: {name} is a {type(t).__name__}, not a plain tensor; block streaming moves raw "
            "bytes and would lose the subclass's state. Keep this block out of the streamed list."
        )
    if t.device.type == "meta":
        raise ValueError(f"offload: {name} is on the meta device (no data); load the weights first")


def block_tensors(blocks: list[nn.Module]) -> list[list[tuple[str, torch.Tensor]]]:
    """Per block, its parameters and buffers (name, tensor), each tensor once.

    A tensor shared by two blocks would be streamed twice and re-pointed by both: refused.
    """
    owner: dict[int, int] = {}
    result = []
    for index, block in enumerate(blocks):
        tensors = []
        named = list(block.named_parameters(remove_duplicate=False))
        named += list(block.named_buffers(remove_duplicate=False))
        for name, t in named:
            key = id(t)
            if key in owner:
                if owner[key] != index:
                    raise ValueError(
                        f"offload: tensor {name!r} of block {index} is also used by block {owner[key]}; "
                        "blocks that share weights cannot be streamed separately. Keep them out of the "
                        "streamed list or pass them as one block."
                    )
                continue  # tied inside one block: one entry, both names see the same tensor object
            _check_tensor(f"block {index}: {name}", t)
            owner[key] = index
            tensors.append((name, t))
        result.append(tensors)
    return result


def _entry_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def block_nbytes(blocks: list[nn.Module]) -> list[int]:
    """Packed bytes of each block (alignment included): what the planner needs as `block_bytes`.

    Sizes add up: a group of blocks packs to exactly the sum of its blocks' sizes.
    """
    return [sum(_align(_entry_nbytes(t)) for _, t in tensors) for tensors in block_tensors(blocks)]


@dataclass(frozen=True)
class GroupLayout:
    """Byte layout of one group of blocks: entries in block order, total nbytes."""

    entries: tuple[TensorEntry, ...]
    nbytes: int

    @staticmethod
    def build(indexed_tensors: list[tuple[int, list[tuple[str, torch.Tensor]]]]) -> GroupLayout:
        """Lay out (block index, that block's block_tensors() list) pairs, in order."""
        entries, offset = [], 0
        for index, tensors in indexed_tensors:
            for name, t in tensors:
                nbytes = _entry_nbytes(t)
                entries.append(
                    TensorEntry(
                        name=f"block {index}: {name}",
                        tensor=t,
                        dtype=t.dtype,
                        shape=tuple(t.shape),
                        stride=_dense_stride(t),
                        offset=offset,
                        nbytes=nbytes,
                    )
                )
                offset += _align(nbytes)
        return GroupLayout(entries=tuple(entries), nbytes=offset)

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(e.view(flat) for e in self.entries)

    def fill(self, flat: torch.Tensor, values: ValuesFor | None = None) -> None:
        """Copy every tensor's current values into its place in `flat` (any device).

        `values(tensor, device)` may give other values for a tensor (same shape and dtype), e.g. a weight
        with a LoRA merged in; None keeps the tensor's own. The tensor itself is never changed."""
        with torch.no_grad():
            for entry in self.entries:
                entry.view(flat).copy_(entry.source(values, flat.device))

    def point_to(self, views: tuple[torch.Tensor, ...]) -> None:
        """Re-point every module tensor at its view: no copy, the old storage loses this reference."""
        for entry, view in zip(self.entries, views):
            entry.tensor.data = view


# ---- host buffers -----------------------------------------------------------------------------


def _cuda_host_register(ptr: int, nbytes: int) -> int:
    """cudaHostRegister; returns the CUDA error code (0 = success). Tests replace this function."""
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _HOST_REGISTER_PORTABLE))


def _cuda_host_unregister(ptr: int) -> int:
    return int(torch.cuda.cudart().cudaHostUnregister(ptr))


def _available_host_bytes() -> int | None:
    try:
        import psutil  # optional: ComfyUI installs it; without it the allocation itself decides
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


@dataclass
class HostGroup:
    """A group's packed host copy. `pinned` is True while the pages are registered with CUDA."""

    buffer: torch.Tensor  # (nbytes,) uint8 on the CPU
    views: tuple[torch.Tensor, ...]
    pinned: bool
    pin_error: str | None = None  # why pinning was refused, when it was asked for and failed

    @property
    def pinned_nbytes(self) -> int:
        """Page-locked bytes (whole pages) while pinned, else 0."""
        return _align(self.buffer.nbytes, PAGE_BYTES) if self.pinned else 0

    def pin(self) -> str | None:
        """Page-lock the buffer again (after unpin); None on success, else why not (it stays pageable)."""
        if not self.pinned and self.buffer.nbytes > 0:
            self.pin_error = _pin(self.buffer)
            self.pinned = self.pin_error is None
        return None if self.pinned or self.buffer.nbytes == 0 else self.pin_error

    def unpin(self) -> None:
        """Give the pages back to the OS's pageable pool; the bytes stay valid (no copy)."""
        if self.pinned:
            self.pinned = False
            code = _cuda_host_unregister(self.buffer.data_ptr())  # the start that was registered
            if code != 0:
                LOG.warning("offload: cudaHostUnregister returned CUDA error %d; continuing", code)


def pin_cost_note() -> str:
    return (
        f"copies from pageable memory run at about {PAGEABLE_H2D_BYTES_PER_S / 1e9:.0f} GB/s instead of "
        f"{PINNED_H2D_BYTES_PER_S / 1e9:.1f} GB/s from pinned memory on the anchor machine (H200, PCIe "
        "Gen5), about 5x slower, and each copy blocks the Python thread"
    )


def _pin(buffer: torch.Tensor) -> str | None:
    """Page-lock `buffer`; returns None on success, else why not.

    Registering after the pages were filled is cheaper than letting the driver fault them in,
    and it pins exactly nbytes: torch's pinned allocator rounds each allocation up to a power of
    two (a 340 MB group would lock 512 MB) and keeps freed blocks cached instead of unlocking them.
    """
    try:
        code = _cuda_host_register(buffer.data_ptr(), _align(buffer.nbytes, PAGE_BYTES))
    except RuntimeError as exc:  # no CUDA runtime, driver refused, ...
        return str(exc)
    return None if code == 0 else f"cudaHostRegister returned CUDA error {code}"


def page_aligned_buffer(nbytes: int) -> torch.Tensor:
    """(nbytes,) uint8 host memory starting on a page and owning whole pages (see PAGE_BYTES), so that it can be
    pinned on its own; a view that keeps its allocation alive."""
    # (PAGE - 1) spare bytes to start on a page, the tail rounded up to whole pages
    raw = torch.empty(_align(nbytes, PAGE_BYTES) + PAGE_BYTES, dtype=torch.uint8, device="cpu")
    shift = -raw.data_ptr() % PAGE_BYTES
    return raw[shift : shift + nbytes]


def pack_host(layout: GroupLayout, pin: bool) -> HostGroup:
    """Allocate the group's host buffer, copy its tensors in, re-point them there, pin if asked.

    When pinning is refused the group stays packed in pageable memory and `pin_error` says why;
    the caller warns once. Not enough host RAM for the buffer raises MemoryError with the numbers.
    """
    available = _available_host_bytes()
    if available is not None and layout.nbytes > available:
        raise MemoryError(
            f"offload: packing a block group needs {fmt_bytes(layout.nbytes)} of host RAM but only "
            f"{fmt_bytes(available)} is available; close other programs, or keep more blocks resident "
            "(raise budget_bytes) so fewer are streamed"
        )
    try:
        buffer = page_aligned_buffer(layout.nbytes)
    except RuntimeError as exc:
        raise MemoryError(
            f"offload: could not allocate {fmt_bytes(layout.nbytes)} of host RAM for a block group: {exc}"
        ) from exc
    layout.fill(buffer)
    views = layout.views(buffer)
    layout.point_to(views)  # from here the old storage is unreferenced (unless someone else holds it)
    host = HostGroup(buffer=buffer, views=views, pinned=False)
    if pin and layout.nbytes > 0:
        host.pin_error = _pin(buffer)
        host.pinned = host.pin_error is None
    return host


class PinQueue:
    """Pins host groups on one helper thread while the caller packs the next group.

    cudaHostRegister spends its time in the kernel locking pages (about 15 GB/s on the H200 machine) and
    torch releases the GIL around it; packing the next group spends its time copying. Streaming Flux-dev
    at 8 GiB packed 7.8 GB in 0.59 s and then pinned it in 0.51 s, one after the other (`packing.py:fill`
    and `_cuda_host_register` in bench/results/gpu_rounds_nvidia-h200_2026-11-22T0406.log).
    After the first refusal the later groups are not tried (each refusal is a slow call of its own); they
    stay pageable with `pin_error` set. `close()` waits for every pin and returns the first refusal.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowvram-pin")
        self._jobs = []
        self.refused: str | None = None

    def submit(self, host: HostGroup) -> None:
        self._jobs.append(self._pool.submit(self._pin, host))

    def _pin(self, host: HostGroup) -> None:
        if self.refused is not None:
            host.pin_error = self.refused
            return
        error = host.pin()
        if error is not None and self.refused is None:
            self.refused = error

    def close(self) -> str | None:
        try:
            for job in self._jobs:
                job.result()
        finally:
            self._pool.shutdown(wait=True)
            self._jobs = []
        return self.refused
