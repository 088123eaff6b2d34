"""Quantizing high-precision weights on an accelerator while a file streams: host -> device -> host.

One weight [out, in] (bf16 in the file) takes this path:
    memory map --CPU copy--> staging_in (pinned) --H2D--> device: amax, scale, quantize
    --D2H--> staging_out[i % 2] (pinned) --CPU copy, helper thread--> a fresh host tensor: the result.
The device runs quant.scales' own functions, so the bytes equal the host path's (quant.stream).
The main thread only copies weights out of the memory map and queues device work; one helper thread
copies finished weights out of staging_out, so the two host copies (the file's 2 bytes a weight in,
1 byte out) overlap. Host RAM holds the results plus staging_in (the largest source weight) and two
staging_out buffers (the largest fp8 weight each), allocated once. Everything runs on the current
stream; the events say when a staging buffer may be reused.

With device "cpu" the same code runs without pinning or events: the tests use it to compare bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .formats import QuantConfig
from .scales import amax, quantize, scale_from_amax

# granularity -> the weight's scale from its per-row amax [out]: [out], [] or 1 (quant.stream uses it too).
SCALE_FROM_ROW_AMAX: dict[str, Callable[[torch.Tensor, object], torch.Tensor]] = {
    "per_channel": lambda row_amax, fmt: scale_from_amax(row_amax, fmt),
    "per_tensor": lambda row_amax, fmt: scale_from_amax(row_amax.max(), fmt),
    "none": lambda row_amax, fmt: torch.ones((), dtype=torch.float32, device=row_amax.device),
}
# False: copy results out of staging_out on the calling thread (what bench/fp8_flux compares against).
COPY_OUT_IN_THREAD = True


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 view (no copy)."""
    return t.reshape(-1).view(torch.uint8)


class DeviceJob:
    """One weight in flight; `result()` waits for it and returns (q fp8, scale fp32, row_amax fp32) on the host."""

    def __init__(self, name: str, future: Future):
        self.name = name
        self._future = future

    @property
    def done(self) -> bool:
        return self._future.done()

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._future.result()


def _copy_out(staging: torch.Tensor, copied: torch.cuda.Event | None, shape: tuple[int, ...], dtype: torch.dtype,
              scale: torch.Tensor, row_amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the helper thread: wait for the D2H, copy the weight into fresh host memory."""
    if copied is not None:
        copied.synchronize()
    q = torch.empty(shape, dtype=dtype)
    _bytes(q).copy_(staging[: q.numel() * q.element_size()])
    if copied is not None:  # pinned (see _small_to_host) -> ordinary memory
        scale, row_amax = scale.clone(), row_amax.clone()
    return q, scale, row_amax


class _Inline:
    """A stand-in for the thread pool that runs the copy at once (COPY_OUT_IN_THREAD = False)."""

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self) -> None:
        pass


class DeviceQuantizer:
    """Quantizes weights on `device` one at a time; results come back to host memory.

    >>> dq = DeviceQuantizer("cpu", max_src_bytes=16, max_q_bytes=8)
    >>> q, scale, _ = dq.submit("w", torch.tensor([[1.0, -2.0], [0.5, 4.0]]), QuantConfig()).result()
    >>> dq.close()
    >>> (q.float() * scale[:, None]).tolist()
    [[1.0, -2.0], [0.5, 4.0]]
    """

    def __init__(self, device: str | torch.device, max_src_bytes: int, max_q_bytes: int):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"quantization device {self.device} was asked for but CUDA is not available; "
                             "pass device='cpu'")
        self._cuda = self.device.type == "cuda"
        # Pinned: the H2D / D2H copies run asynchronously at full link speed (pageable: about 1/5).
        self._staging_in = torch.empty(max_src_bytes, dtype=torch.uint8, pin_memory=self._cuda)
        self._staging_out = [torch.empty(max_q_bytes, dtype=torch.uint8, pin_memory=self._cuda) for _ in range(2)]
        self._out_busy: list[Future | None] = [None, None]  # the copy out of each staging_out buffer
        self._slot = 0
        self._in_free: torch.cuda.Event | None = None  # the H2D out of staging_in has finished
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowvram-copy-out") if COPY_OUT_IN_THREAD else _Inline()

    def _small_to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A scale or row amax ([out] fp32 at most) queued for the host without waiting."""
        if not self._cuda:
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    def submit(self, name: str, src: torch.Tensor, cfg: QuantConfig) -> DeviceJob:
        """Start quantizing `src` (a CPU [out, in] tensor, e.g. a memory-mapped view); returns once the
        CPU has copied it into staging_in and the device work is queued."""
        n_src = src.numel() * src.element_size()
        n_q = src.numel() * cfg.format.dtype.itemsize
        if n_src > self._staging_in.numel() or n_q > self._staging_out[0].numel():
            raise ValueError(f"{name}: {n_src} bytes exceed the staging buffer sized for {self._staging_in.numel()}; "
                             "size DeviceQuantizer by the largest weight")
        if self._in_free is not None:
            self._in_free.synchronize()  # overwriting staging_in before its H2D ran would corrupt that weight
        staged = self._staging_in[:n_src]
        staged.copy_(_bytes(src.contiguous()))  # reads the file's pages (multi-threaded copy)
        w = staged.to(self.device, non_blocking=True).view(src.dtype).view(src.shape)
        if self._cuda:
            self._in_free = torch.cuda.Event()
            self._in_free.record()
        # The host path's functions, whole tensor at once (quantize() still works in row blocks).
        fmt = cfg.format
        row_amax = amax(w, "per_channel")
        scale = SCALE_FROM_ROW_AMAX[cfg.granularity](row_amax, fmt)
        q = quantize(w, scale, fmt)
        del w
        slot, self._slot = self._slot, self._slot ^ 1
        if self._out_busy[slot] is not None:
            self._out_busy[slot].result()  # the weight before last is still being copied out of this buffer
        out = self._staging_out[slot]
        out[:n_q].copy_(_bytes(q), non_blocking=True)
        scale_h, row_amax_h = self._small_to_host(scale), self._small_to_host(row_amax)
        copied = None
        if self._cuda:
            copied = torch.cuda.Event()
            copied.record()
        future = self._pool.submit(_copy_out, out, copied, tuple(src.shape), fmt.dtype, scale_h, row_amax_h)
        self._out_busy[slot] = future
        return DeviceJob(name, future)

    def close(self) -> None:
        """Wait for what is in flight and drop the staging buffers and the helper thread."""
        for busy in self._out_busy:
            if busy is not None and not busy.cancelled():
                busy.exception()  # waits; an error surfaces through the job's result()
        self._pool.shutdown()
        self._staging_in = torch.empty(0, dtype=torch.uint8)
        self._staging_out = []
        self._out_busy = [None, None]
        self._in_free = None
