"""Streams TensorSpecs into a safetensors file one tensor at a time (host RAM never holds the model).

safetensors layout: 8-byte little-endian header length N, N bytes of JSON (keys -> dtype, shape,
data_offsets relative to the data area; plus "__metadata__" str->str), then the raw tensor bytes.
Because every shape is known up front, the header is written first and the data streamed after it.

On CUDA the tensors are generated on the GPU and copied through two pinned host buffers while a
writer thread drains them to the file, so generation, PCIe copy and disk write overlap.
"""
from __future__ import annotations

import json
import os
import queue
import struct
import threading
from typing import Callable

import torch

from .init import make_tensor
from .spec import ST_DTYPE, TensorSpec, check_unique

CHUNK_BYTES = 256 << 20   # pinned staging buffer size (CUDA path)
Progress = Callable[[int, int], None]


def build_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The header bytes (length prefix included), padded with spaces to 8-byte alignment."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for s in specs:
        header[s.key] = {"dtype": ST_DTYPE[s.dtype], "shape": list(s.shape),
                         "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read_header(path: str | os.PathLike) -> dict:
    """The parsed JSON header of a safetensors file (no tensor data is read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise ValueError(f"{path}: header length {n} is implausible; not a safetensors file")
        return json.loads(f.read(n))


def write_sparse(path: str | os.PathLike, specs: list[TensorSpec], metadata: dict[str, str]) -> int:
    """Header only, then truncate to full length: a full-size file that takes no disk (reads as zeros).

    For detection/planning tests of full-size models on a machine that cannot hold them.
    """
    specs = check_unique(specs, str(path))
    header = build_header(specs, metadata)
    size = len(header) + sum(s.nbytes for s in specs)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)
    return size


def write_specs(path: str | os.PathLike, specs: list[TensorSpec], metadata: dict[str, str], seed: int,
                device: str | torch.device = "cpu", progress: Progress | None = None) -> str:
    """Write all tensors of `specs` to `path` atomically (via `<path>.<pid>.partial`, then os.replace).

    The pid in the temporary name keeps two processes writing the same model from mixing bytes.

    On any error, the partial file is removed and the error re-raised; an existing `path` is untouched.
    """
    path = os.fspath(path)
    specs = check_unique(specs, path)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"writing {path}: --device cuda asked for, but torch sees no CUDA device; "
                           "use --device cpu")
    partial = f"{path}.{os.getpid()}.partial"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    total = sum(s.nbytes for s in specs)
    try:
        with open(partial, "wb") as f:
            f.write(build_header(specs, metadata))
            if device.type == "cuda":
                _stream_cuda(f, specs, seed, device, total, progress)
            else:
                _stream_cpu(f, specs, seed, device, total, progress)
        os.replace(partial, path)
    except BaseException:
        # KeyboardInterrupt too: never leave a half-written file that a later run could mistake.
        if os.path.exists(partial):
            os.remove(partial)
        raise
    return path


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    # Raw bytes of a contiguous tensor, any dtype (bf16/fp8 have no numpy dtype, uint8 does).
    return t.reshape(-1).view(torch.uint8)


class _Drain:
    """A writer thread that drains (bytes, event) items to the file while the caller generates the next.

    CPU: items are the generated tensors' bytes (at most two alive at once, so host RAM holds two
    tensors, never the model). CUDA: items are pinned staging buffers plus the event of their copy.
    """

    def __init__(self, f, total: int, progress: Progress | None, recycle: queue.Queue | None = None):
        self.f, self.total, self.progress, self.recycle = f, total, progress, recycle
        self.items: queue.Queue = queue.Queue(maxsize=1)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="synthetic-writer", daemon=True)
        self.thread.start()

    def _run(self):
        done = 0
        while True:
            item = self.items.get()
            if item is None:
                return
            data, n, event, buf = item
            try:
                if not self.errors:
                    if event is not None:
                        # The device->pinned copy was only queued; its bytes are valid after the event.
                        event.synchronize()
                    self.f.write(memoryview(data.numpy()))
                    done += n
                    if self.progress:
                        self.progress(done, self.total)
            except BaseException as e:  # handed to the generating thread, which re-raises it
                self.errors.append(e)
            if buf is not None:
                self.recycle.put(buf)

    def put(self, data: torch.Tensor, event=None, buf=None):
        if self.errors:
            raise self.errors[0]
        self.items.put((data, data.numel(), event, buf))

    def close(self):
        self.items.put(None)
        self.thread.join()
        if self.errors:
            raise self.errors[0]


def _stream_cpu(f, specs, seed, device, total, progress):
    drain = _Drain(f, total, progress)
    try:
        for s in specs:
            drain.put(_bytes_view(make_tensor(s, seed, device)))
    finally:
        drain.close()


def _stream_cuda(f, specs, seed, device, total, progress):
    free: queue.Queue = queue.Queue()
    largest = max((s.nbytes for s in specs), default=1)
    for _ in range(2):
        free.put(torch.empty(min(CHUNK_BYTES, largest), dtype=torch.uint8, pin_memory=True))
    drain = _Drain(f, total, progress, recycle=free)
    try:
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            for s in specs:
                flat = _bytes_view(make_tensor(s, seed, device))
                for off in range(0, flat.numel(), CHUNK_BYTES):
                    piece = flat[off:off + CHUNK_BYTES]
                    buf = free.get()
                    staged = buf[:piece.numel()]
                    staged.copy_(piece, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                    drain.put(staged, event, buf)
    finally:
        drain.close()
