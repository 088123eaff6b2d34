"""VRAMGuard's memory monitor: a thread that samples the device every 10 ms (or finer) during a prompt,
with named stages (text encoding, sampling, decoding) whose peak and duration the report shows.

Readers, best first (`MemoryReader.open`):
- NVML "used" of the GPU the model runs on: counts every process, the CUDA context, cuBLAS workspaces;
- PyTorch's counters (memory_reserved of this process) when NVML is missing or fails, said in `note`;
- host RAM (RSS of this process) on the CPU.

    mon = Monitor(MemoryReader.open(torch.device("cuda", 0)), interval_s=0.01)
    mon.start()
    with mon.stage("sampling"):
        ...
    result = mon.stop()          # MonitorResult: samples (t, bytes), stages, peak, baseline, source
"""
from __future__ import annotations

import logging
import os
import threading
import time
from array import array
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger("lowvram")
MAX_INTERVAL_S = 0.01
MAX_SAMPLES = 1_000_000     # 10 ms for 2.7 hours; beyond, every second sample is dropped (peaks kept)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def nvml_index(device) -> int:
    """NVML numbers GPUs physically; torch numbers the ones CUDA_VISIBLE_DEVICES shows."""
    idx = device.index if device.index is not None else 0
    parts = [p.strip() for p in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts) and idx < len(parts):
        return int(parts[idx])
    return idx


def host_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        import psutil
        return psutil.Process().memory_info().rss


class MemoryReader:
    """used() -> bytes in use; free() -> bytes free for this process; total; source; note."""

    def __init__(self, source: str, used, free, total: int, note: str = "", close=None):
        self.source, self.used, self.free, self.total, self.note = source, used, free, total, note
        self._close = close

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    @staticmethod
    def open(device) -> "MemoryReader":
        if getattr(device, "type", "cpu") != "cuda":
            return MemoryReader.host()
        nvml = MemoryReader.nvml(device)
        return nvml if isinstance(nvml, MemoryReader) else MemoryReader.torch_counters(device, nvml)

    @staticmethod
    def host() -> "MemoryReader":
        import psutil
        total = psutil.virtual_memory().total
        return MemoryReader("host RAM", host_rss_bytes, lambda: psutil.virtual_memory().available, total,
                            "no GPU: host RAM of this process (RSS) is reported")

    @staticmethod
    def nvml(device):
        """A reader, or the reason NVML cannot be used (a string)."""
        try:
            import pynvml   # lazy: optional dependency (nvidia-ml-py)
        except ImportError:
            return "pynvml (nvidia-ml-py) is not installed"
        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(device))
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        except pynvml.NVMLError as e:
            return f"NVML failed ({e})"

        def info():
            return pynvml.nvmlDeviceGetMemoryInfo(handle)
        return MemoryReader(f"nvml (GPU {nvml_index(device)})", lambda: info().used, lambda: info().free, total,
                            close=pynvml.nvmlShutdown)

    @staticmethod
    def torch_counters(device, why: str) -> "MemoryReader":
        import torch
        total = torch.cuda.get_device_properties(device).total_memory
        return MemoryReader("torch.cuda.memory_reserved", lambda: torch.cuda.memory_reserved(device),
                            lambda: torch.cuda.mem_get_info(device)[0], total,
                            f"{why}: using PyTorch's counters, which see only this process's tensors "
                            "(not the CUDA context, cuBLAS workspaces or other processes)")


@dataclass(frozen=True)
class StageResult:
    name: str
    start_s: float          # seconds since the monitor started
    end_s: float
    peak_bytes: int         # highest reading inside the stage (absolute, as the reader reports it)

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class MonitorResult:
    source: str
    note: str
    interval_s: float
    baseline_bytes: int     # reading when the monitor started
    peak_bytes: int
    end_bytes: int
    duration_s: float
    times_s: tuple[float, ...]
    used_bytes: tuple[int, ...]
    stages: tuple[StageResult, ...]
    read_errors: int = 0

    @property
    def peak_above_baseline(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)


class Monitor:
    """Samples `reader.used()` in a daemon thread; `stage(name)` marks spans. One start, one stop."""

    def __init__(self, reader: MemoryReader, interval_s: float = MAX_INTERVAL_S):
        if not 0 < interval_s <= MAX_INTERVAL_S:
            raise ValueError(f"Monitor interval_s must be in (0, {MAX_INTERVAL_S}] s, got {interval_s}")
        self.reader, self.interval_s = reader, interval_s
        self._times, self._used = array("d"), array("q")
        self._stages: list[list] = []       # [name, start, end or None]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._baseline = 0
        self._errors = 0
        self.result: MonitorResult | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> "Monitor":
        if self._thread is not None or self.result is not None:
            raise RuntimeError("Monitor.start(): a monitor runs once; make a new one")
        self._t0 = time.perf_counter()
        self._baseline = self._read() or 0
        self._record(self._baseline)
        self._thread = threading.Thread(target=self._run, name="VRAMGuardMonitor", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> int | None:
        try:
            return int(self.reader.used())
        except Exception as e:  # noqa: BLE001  (NVML errors vary by driver; a monitor must not kill a prompt)
            self._errors += 1
            if self._errors == 1:
                log.warning("LowVRAM Kit VRAMGuard: reading memory failed (%s: %s); the timeline has gaps",
                            type(e).__name__, e)
            return None

    def _record(self, used: int) -> None:
        with self._lock:
            self._times.append(time.perf_counter() - self._t0)
            self._used.append(used)
            if len(self._used) >= MAX_SAMPLES:
                self._decimate()

    def _decimate(self) -> None:
        # keep the larger of each pair, so no peak is lost
        t, u = self._times, self._used
        self._times = array("d", t[1::2])
        self._used = array("q", (max(a, b) for a, b in zip(u[0::2], u[1::2])))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            used = self._read()
            if used is not None:
                self._record(used)

    def mark(self, name: str) -> None:
        """Start stage `name` now, ending the one in progress."""
        now = time.perf_counter() - self._t0
        with self._lock:
            if self._stages and self._stages[-1][2] is None:
                self._stages[-1][2] = now
            self._stages.append([name, now, None])

    def end_stage(self) -> None:
        now = time.perf_counter() - self._t0
        with self._lock:
            if self._stages and self._stages[-1][2] is None:
                self._stages[-1][2] = now

    @contextmanager
    def stage(self, name: str):
        self.mark(name)
        try:
            yield self
        finally:
            self.end_stage()

    def stop(self) -> MonitorResult:
        if self.result is not None:
            return self.result
        if self._thread is None:
            raise RuntimeError("Monitor.stop() before start()")
        self._stop.set()
        self._thread.join(timeout=2)
        self._thread = None
        last = self._read()
        if last is not None:
            self._record(last)
        self.end_stage()
        self.reader.close()
        with self._lock:
            times, used = tuple(self._times), tuple(self._used)
            stages = tuple(StageResult(n, a, b, _peak_in(times, used, a, b)) for n, a, b in self._stages)
        self.result = MonitorResult(self.reader.source, self.reader.note, self.interval_s, self._baseline,
                                    max(used), used[-1], times[-1], times, used, stages, self._errors)
        self._times, self._used = array("d"), array("q")   # the result holds them; free the buffers
        return self.result


def _peak_in(times, used, a: float, b: float) -> int:
    inside = [u for t, u in zip(times, used) if a <= t <= b]
    if inside:
        return max(inside)
    # a stage shorter than one interval: the nearest reading before it
    before = [u for t, u in zip(times, used) if t <= a]
    return before[-1] if before else (used[0] if used else 0)
