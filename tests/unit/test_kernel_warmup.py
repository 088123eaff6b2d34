"""quant.kernel_warmup: started once per (device, dtype) and process, and never raising into a load."""
import doctest
import logging

import torch

from quant import kernel_warmup


def test_doctest():
    assert doctest.testmod(kernel_warmup).failed == 0


def test_a_warm_up_starts_once_per_device_and_dtype_and_a_failure_is_only_logged(monkeypatch, caplog):
    monkeypatch.setattr(kernel_warmup, "_STARTED", set())
    caplog.set_level(logging.DEBUG, logger="lowvram")
    # No CUDA here (CI): the thread's first CUDA call fails, which must end in a debug line, not an error.
    thread = kernel_warmup.warm_fp8_kernels_in_background("cuda:0", (torch.bfloat16,))
    if torch.cuda.is_available():
        thread.join()
        return
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert "fp8 kernel warm-up skipped" in caplog.text
    assert kernel_warmup.warm_fp8_kernels_in_background("cuda:0", (torch.bfloat16,)) is None   # already started
    again = kernel_warmup.warm_fp8_kernels_in_background("cuda:0", (torch.float16,))           # a new dtype
    assert again is not None
    again.join(timeout=30)
