"""Device memory used over time (NVML, every process on the GPU), sampled in a thread, with no CUDA in
this process: for benchmarks whose workload runs in another process. Without NVML every reading is None.

Every CLOCK_EVERY-th sample also reads the SM clock, the board power and the reasons NVML gives for holding
the clocks down (power cap, thermal...): whether a slow stretch of steps was the GPU slowing down or the host.
"""
from __future__ import annotations

import bisect
import threading
import time

CLOCK_EVERY = 10    # of the memory samples (every 50 ms at the default interval)
# NVML's clock event reason bits (nvmlClocksEventReason*) -> names; idle and application settings left out.
CLOCK_REASONS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal",
                 0x40: "hw_thermal", 0x80: "hw_power_brake"}


class NvmlTimeline:
    def __init__(self, device_index: int = 0, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.times: list[float] = []      # time.monotonic() of each sample
        self.used: list[int] = []         # bytes used on the device at that time
        self.clocks: list[tuple[float, int, float, int]] = []   # (time, SM MHz, board W, reason bits)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="NvmlTimeline", daemon=True)
        self._read = self._reader(device_index)
        self._read_clocks = self._clock_reader(device_index) if self._read else None

    @staticmethod
    def _reader(index: int):
        try:
            import pynvml  # from nvidia-ml-py

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        except Exception:  # noqa: BLE001  (no driver, no library: a CPU machine)
            return None

    @staticmethod
    def _clock_reader(index: int):
        try:
            import pynvml

            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
                pynvml.nvmlDeviceGetCurrentClocksThrottleReasons

            def read():
                return (pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                        pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, int(reasons(handle)))
            read()
            return read
        except Exception:  # noqa: BLE001  (older drivers lack a query: memory only)
            return None

    def clocks_between(self, t0: float, t1: float) -> list[tuple[float, int, float, int]]:
        """The clock samples in [t0, t1]."""
        times = [c[0] for c in self.clocks]
        return self.clocks[bisect.bisect_left(times, t0):bisect.bisect_right(times, t1)]

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
        n = 0
        while not self._stop.is_set():
            now = time.monotonic()
            self.times.append(now)
            self.used.append(self._read())
            if self._read_clocks is not None and n % CLOCK_EVERY == 0:
                try:
                    self.clocks.append((now, *self._read_clocks()))
                except Exception:  # noqa: BLE001  (a failed read leaves a gap, never stops the timeline)
                    pass
            n += 1
            self._stop.wait(self.interval_s)

    def peak_between(self, t0: float, t1: float) -> int | None:
        """Highest reading in [t0, t1] (None without NVML or without a sample there)."""
        if not self._read:
            return None
        i, j = bisect.bisect_left(self.times, t0), bisect.bisect_right(self.times, t1)
        return max(self.used[i:j]) if j > i else None
