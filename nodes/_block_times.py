"""Block compute times remembered across server starts (plain Python, no ComfyUI import).

ChunkedOffloadUNet times each block in a warm step after its first load and plans again with the
times, which costs a second attach (packing and pinning what moved). The times depend only on the model,
the latent shape and the GPU, so they are kept in one small JSON file (ComfyUI's user folder): after a
restart the first load plans with them at once.

    store = BlockTimes(path)
    key = times_key("flux", block_bytes, "NVIDIA H200", (1, 16, 128, 128))
    store.get(key)            # None, or [seconds per block]
    store.put(key, seconds, activation_bytes=n)   # written atomically; a damaged file is replaced, never trusted
    store.get_activation(key) # None, or the device bytes the timed step's activations took (allocator slack in)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading

log = logging.getLogger("lowvram")
# 2: times come from the second model call after a load; version 1 timed the first, which carries one-time
# kernel compilation and made compute look many times slower (such files are not trusted).
FILE_VERSION = 2
MAX_ENTRIES = 64   # oldest dropped first: a handful of models x resolutions per machine


def times_key(family: str, block_bytes: list[int], device_name: str, shape: tuple[int, ...]) -> str:
    """One model (its family and the bytes of each block), one GPU, one latent shape of a model call."""
    blocks = hashlib.sha1(json.dumps(list(block_bytes)).encode()).hexdigest()[:16]
    return f"{family}|{blocks}|{device_name}|{'x'.join(str(int(d)) for d in shape)}"


class BlockTimes:
    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else os.fspath(path)
        self._lock = threading.Lock()

    def _read_all(self) -> tuple[dict, dict]:
        """(times, activation bytes) by key; the second map came later, so a file without it is still valid."""
        if self.path is None or not os.path.exists(self.path):
            return {}, {}
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("version") == FILE_VERSION and isinstance(data.get("times"), dict):
                act = data.get("activation_bytes")
                return data["times"], act if isinstance(act, dict) else {}
        except (OSError, ValueError, AttributeError) as e:
            log.warning("LowVRAM Kit: ignoring the block-time file %s (%s); it will be rewritten", self.path, e)
        return {}, {}

    def _read(self) -> dict:
        return self._read_all()[0]

    def get(self, key: str) -> list[float] | None:
        with self._lock:
            found = self._read().get(key)
        if isinstance(found, list) and found and all(isinstance(s, (int, float)) and s >= 0 for s in found):
            return [float(s) for s in found]
        return None

    def get_activation(self, key: str) -> int | None:
        with self._lock:
            found = self._read_all()[1].get(key)
        return int(found) if isinstance(found, int) and not isinstance(found, bool) and found >= 0 else None

    def put(self, key: str, seconds: list[float], activation_bytes: int | None = None) -> None:
        if self.path is None:
            return
        with self._lock:
            times, activations = self._read_all()
            times.pop(key, None)
            activations.pop(key, None)
            times[key] = [round(float(s), 7) for s in seconds]
            if activation_bytes is not None:
                activations[key] = int(activation_bytes)
            while len(times) > MAX_ENTRIES:
                activations.pop(next(iter(times)), None)
                times.pop(next(iter(times)))
            folder, tmp = os.path.dirname(self.path) or ".", None
            try:
                os.makedirs(folder, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".block_times.", dir=folder)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"version": FILE_VERSION, "times": times,
                               **({"activation_bytes": activations} if activations else {})}, f)
                os.replace(tmp, self.path)
            except OSError as e:   # a read-only user folder only costs the timing pass after a restart
                log.warning("LowVRAM Kit: could not save block times to %s (%s)", self.path, e)
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
