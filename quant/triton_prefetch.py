"""Compute Triton's installation key in a background thread at start-up, not inside the first prompt.

The first launch of any Triton kernel in a process hashes Triton's own installation (its compiler and
language sources and libtriton.so) into the key of its kernel cache, before it even looks at the cache:
0.49 s of the Flux 8 GB workflow's first prompt on the H200 machine (`cache.py:triton_key` under
`act_quant_triton.py:launch_per_token` in bench/results/gpu_rounds_nvidia-h200_2026-11-22T0406.log).
The key depends on nothing but the installed files, and Triton keeps it for the life of the process
(functools.lru_cache), so computing it once while the server starts moves that time out of the first
prompt. The hashing runs in hashlib, which releases the GIL: the thread does not hold up the server.

Compiling or loading kernels needs the GPU and, run beside the model loading (inside the first prompt), made the
loading slower (bench/results/gpu_rounds_nvidia-h200_2026-11-22T0356.log); the pack asks for it here, at server
start, before any prompt (`then`: quant.kernel_warmup).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("lowvram")

# Where Triton keeps the function, newest first (it moved from the compiler to the runtime's cache module).
KEY_FUNCTIONS = (("triton.runtime.cache", "triton_key"), ("triton.compiler.compiler", "triton_key"))
THREAD_NAME = "lowvram-triton-key"


def find_key_function() -> Callable[[], str] | None:
    """Triton's cached key function, or None when triton is missing or keeps it elsewhere."""
    if importlib.util.find_spec("triton") is None:
        return None
    for module, name in KEY_FUNCTIONS:
        try:
            fn = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if callable(fn) and hasattr(fn, "cache_info"):   # only a cached key is worth computing ahead
            return fn
    return None


def _compute(then: Callable[[], object] | None = None) -> None:
    try:
        fn = find_key_function()
        if fn is not None:
            fn()
        if then is not None:
            then()
    except Exception:  # noqa: BLE001  (an optimisation: the first kernel launch does all of it anyway)
        log.debug("LowVRAM Kit: preparing Triton ahead failed", exc_info=True)


def prefetch_triton_key(cuda_available: bool, then: Callable[[], object] | None = None) -> threading.Thread | None:
    """Start the background thread where Triton kernels can run (CUDA present, triton installed); else None.
    `then` runs in it after the key: the server start warms the fp8 kernels so (quant.kernel_warmup)."""
    if not cuda_available or importlib.util.find_spec("triton") is None:
        return None
    thread = threading.Thread(target=_compute, args=(then,), name=THREAD_NAME, daemon=True)
    thread.start()
    return thread
