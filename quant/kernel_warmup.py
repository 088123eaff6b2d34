"""Start the fp8 Linear's GPU kernels in a background thread while a model file loads.

The first fp8 Linear call of a process pays one-time costs on the prompt's path: Triton hashes its own
sources for its cache key and loads (or, with an empty disk cache, compiles) the activation quantizer, and
cuBLASLt sets itself up for torch._scaled_mm. On the H200 the first two took 0.47-0.67 s of the first
prompt (bench.stack_sampler call trees, T0322 / T0324: jit.py:_do_compile > cache.py:triton_key 0.40-0.42 s),
inside the first Flux step or NewBie's text encoding. Loading the model file takes seconds of reading and
GPU quantization, mostly outside the GIL; one tiny call per input dtype in a daemon thread meanwhile takes
those costs off the prompt. Per process and (device, dtype) once; never raises (a failure only means the
first real call pays as before).

    >>> warm_fp8_kernels_in_background("cpu") is None    # nothing to start without CUDA
    True
"""
from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger("lowvram")
_STARTED: set[tuple[str, torch.dtype]] = set()
_LOCK = threading.Lock()


def warm_fp8_kernels_in_background(device, dtypes=(torch.bfloat16,)) -> threading.Thread | None:
    """A started daemon thread warming the kernels for inputs of `dtypes` on a CUDA `device` (None: nothing
    to do: not CUDA, or already started in this process)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    with _LOCK:
        todo = [dt for dt in dtypes if (str(device), dt) not in _STARTED]
        _STARTED.update((str(device), dt) for dt in todo)
    if not todo:
        return None
    thread = threading.Thread(target=_warm, args=(device, todo), daemon=True, name="lowvram-fp8-warmup")
    thread.start()
    return thread


def _warm(device: torch.device, dtypes: list[torch.dtype]) -> None:
    try:
        with torch.cuda.device(device), torch.no_grad():
            for dtype in dtypes:
                x = torch.ones((16, 16), dtype=dtype, device=device)   # [M, K]: the smallest GEMM cuBLASLt takes
                a, scale = _quantizer()(x, "per_token")
                w = torch.ones((16, 16), dtype=torch.float8_e4m3fn, device=device)
                one = torch.ones((1, 16), dtype=torch.float32, device=device)
                torch._scaled_mm(a, w.t(), scale_a=scale, scale_b=one, out_dtype=dtype)
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001  (a warm-up must never fail a load)
        log.debug("LowVRAM Kit: fp8 kernel warm-up skipped (%s: %s)", type(e).__name__, e)


def _quantizer():
    from .matmul import ACT_QUANTIZERS

    return ACT_QUANTIZERS["auto"]()
