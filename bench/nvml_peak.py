"""Peak device memory in a background thread: NVML "used" sampled every few ms, above a baseline.

NVML sees what the driver hands out to the whole device (cuBLAS workspaces, the caching allocator's
slack, other libraries), which `torch.cuda.max_memory_allocated()` misses. Take the sampler AFTER the
ballast so the baseline includes it:

    with Ballast(budget), PeakSampler() as s:
        work()
    s.reading.peak_bytes            # NVML used above the baseline; compare with the budget

Without `pynvml` (package nvidia-ml-py) or a working NVML, it falls back to torch's
`max_memory_reserved()` above the level at start, and says so in `reading.source` / `reading.note`.
Host RSS (from /proc/self/statm) is sampled in the same thread where that file exists.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

DEFAULT_INTERVAL_S = 0.002   # the brief asks for <= 5 ms; one NVML query costs tens of microseconds
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class PeakReading:
    peak_bytes: int | None          # device memory above the baseline (None: no CUDA at all)
    baseline_bytes: int | None      # device memory used when sampling started
    source: str                     # "nvml", "torch.max_memory_reserved" or "none"
    samples: int
    host_rss_peak_bytes: int | None
    note: str = ""


def _host_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _nvml_open(device_index: int):
    """(pynvml module, handle, used bytes), or (None, None, reason) when NVML cannot be used."""
    try:
        import pynvml   # lazy: optional dependency (nvidia-ml-py)
    except ImportError:
        return None, None, "pynvml (nvidia-ml-py) not installed"
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        return pynvml, handle, pynvml.nvmlDeviceGetMemoryInfo(handle).used
    except pynvml.NVMLError as e:
        return None, None, f"NVML unavailable ({e})"


def nvml_device_index(device: torch.device) -> int:
    """NVML index of a torch CUDA device: NVML ignores CUDA_VISIBLE_DEVICES, so map through it."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    parts = [p.strip() for p in visible.split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts) and idx < len(parts):
        return int(parts[idx])
    return idx


class PeakSampler:
    def __init__(self, device: str | torch.device = "cuda", interval_s: float = DEFAULT_INTERVAL_S):
        if interval_s <= 0:
            raise ValueError(f"PeakSampler interval_s must be > 0, got {interval_s}")
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.reading: PeakReading | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_used = 0
        self._peak_rss: int | None = None
        self._samples = 0
        self._baseline: int | None = None
        self._source = "none"
        self._note = ""
        self._nvml = None

    # --- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> "PeakSampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._peak_rss = _host_rss_bytes()
        if self.device.type != "cuda" or not torch.cuda.is_available():
            self._note = "no CUDA device: device peak not measured"
        else:
            torch.cuda.synchronize(self.device)
            pynvml, handle, used = _nvml_open(nvml_device_index(self.device))
            if pynvml is not None:
                self._nvml = (pynvml, handle)
                self._baseline = used
                self._source = "nvml"
            else:
                self._note = f"{used}: peak from torch.max_memory_reserved"
            if self._nvml is None:
                torch.cuda.reset_peak_memory_stats(self.device)
                self._baseline = torch.cuda.memory_reserved(self.device)
                self._source = "torch.max_memory_reserved"
        self._peak_used = self._baseline or 0
        self._thread = threading.Thread(target=self._run, name="PeakSampler", daemon=True)
        self._thread.start()

    def stop(self) -> PeakReading:
        if self._thread is None:
            raise RuntimeError("PeakSampler.stop() called before start()")
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)   # the work measured must be finished, not just queued
        self._stop.set()
        self._thread.join()
        self._sample()                            # one last reading after the work ended
        if self._source == "torch.max_memory_reserved":
            self._peak_used = max(self._peak_used, torch.cuda.max_memory_reserved(self.device))
        peak = None if self._baseline is None else max(0, self._peak_used - self._baseline)
        self.reading = PeakReading(peak, self._baseline, self._source, self._samples, self._peak_rss,
                                   self._note)
        if self._nvml is not None:
            self._nvml[0].nvmlShutdown()
            self._nvml = None
        self._thread = None
        return self.reading

    # --- sampling ----------------------------------------------------------------------------------
    def _sample(self) -> None:
        if self._nvml is not None:
            pynvml, handle = self._nvml
            used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
            self._peak_used = max(self._peak_used, used)
        rss = _host_rss_bytes()
        if rss is not None:
            self._peak_rss = rss if self._peak_rss is None else max(self._peak_rss, rss)
        self._samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()
