"""Device memory used over time (NVML, every process on the GPU), sampled in a thread, with no CUDA in
this process: for benchmarks whose workload runs in another process. Without NVML every reading is None.
"""
from __future__ import annotations

import bisect
import threading
import time


class NvmlTimeline:
    def __init__(self, device_index: int = 0, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.times: list[float] = []      # time.monotonic() of each sample
        self.used: list[int] = []         # bytes used on the device at that time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="NvmlTimeline", daemon=True)
        self._read = self._reader(device_index)

    @staticmethod
    def _reader(index: int):
        try:
            import pynvml  # from nvidia-ml-py

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        except Exception:  # noqa: BLE001  (no driver, no library: a CPU machine)
            return None

    @property
    def available(self) -> bool:
        return self._read is not None

    def used_now(self) -> int | None:
        return self._read() if self._read else None

    def __enter__(self) -> "NvmlTimeline":
        if self._read:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.times.append(time.monotonic())
            self.used.append(self._read())
            self._stop.wait(self.interval_s)

    def peak_between(self, t0: float, t1: float) -> int | None:
        """Highest reading in [t0, t1] (None without NVML or without a sample there)."""
        if not self._read:
            return None
        i, j = bisect.bisect_left(self.times, t0), bisect.bisect_right(self.times, t1)
        return max(self.used[i:j]) if j > i else None
