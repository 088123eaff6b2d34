"""Peak memory of a running server, sampled in a thread.

On a machine with an NVIDIA driver: device memory used (NVML, counts every process and the CUDA context).
Otherwise: resident host memory of the server process and its children (psutil). The report says which.
"""
from __future__ import annotations

import threading


class PeakSampler:
    def __init__(self, pid: int, interval_s: float = 0.01):
        self.pid, self.interval_s = pid, interval_s
        self.kind, self.peak_bytes, self.baseline_bytes = "none", 0, 0
        self._stop = threading.Event()
        self._read = self._choose_reader()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _choose_reader(self):
        try:
            import pynvml  # from nvidia-ml-py; optional

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.kind = "GPU memory used (NVML, device 0)"
            return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        except Exception:  # no driver, no library, no device: fall back to host memory  # noqa: BLE001
            import psutil

            proc = psutil.Process(self.pid)
            self.kind = "host RAM (RSS of the ComfyUI process and children; no NVIDIA GPU here)"

            def rss() -> int:
                try:
                    return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                except psutil.Error:
                    return 0
            return rss

    def __enter__(self):
        self.baseline_bytes = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._read())
            self._stop.wait(self.interval_s)
