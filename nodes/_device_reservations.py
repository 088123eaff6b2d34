"""Device memory that work running beside the prompt's nodes is about to use, kept out of our budgets.

Float8DiTLoader quantizes its file in a worker thread while ComfyUI runs the text encoder's nodes (see
float8_dit_loader.py). The quantizer's device memory comes and goes weight by weight, and the caching
allocator's blocks it frees in between count as free in ComfyUI's get_free_memory: a text encoder that
planned with "everything free" could take them, and the next weight would run out of memory. The loader
reserves its peak here for as long as it quantizes, and our streaming plans (ChunkedOffloadTextEncoder,
ChunkedOffloadUNet) read free memory through `free_memory`, which leaves the reservations out.
"""
from __future__ import annotations

import contextlib
import threading

import torch

import comfy.model_management

_lock = threading.Lock()
_reserved: dict[str, list[int]] = {}  # str(device) -> the bytes of each reservation now held


def _key(device) -> str:
    return str(torch.device(device))


@contextlib.contextmanager
def reserve(device, nbytes: int):
    """Hold `nbytes` of `device` out of free_memory() inside the block."""
    key, nbytes = _key(device), max(0, int(nbytes))
    with _lock:
        _reserved.setdefault(key, []).append(nbytes)
    try:
        yield
    finally:
        with _lock:
            _reserved[key].remove(nbytes)


def reserved_bytes(device) -> int:
    with _lock:
        return sum(_reserved.get(_key(device), ()))


def free_memory(device) -> int:
    """ComfyUI's free memory on `device` less what concurrent work has reserved (never below 0)."""
    return max(0, int(comfy.model_management.get_free_memory(device)) - reserved_bytes(device))
