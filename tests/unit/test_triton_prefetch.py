"""quant.triton_prefetch: Triton's cached installation key is computed by the background thread."""

import importlib.util

import pytest

from quant import triton_prefetch


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed here")
def test_the_thread_fills_tritons_cached_key():
    fn = triton_prefetch.find_key_function()
    assert fn is not None, "triton is installed but its key function was not found where KEY_FUNCTIONS look"
    fn.cache_clear()
    thread = triton_prefetch.prefetch_triton_key(cuda_available=True)
    assert thread is not None and thread.name == triton_prefetch.THREAD_NAME
    thread.join(timeout=60)
    assert fn.cache_info().currsize == 1   # the first kernel launch finds it computed


def test_nothing_starts_without_cuda_or_triton(monkeypatch):
    assert triton_prefetch.prefetch_triton_key(cuda_available=False) is None
    monkeypatch.setattr(triton_prefetch.importlib.util, "find_spec", lambda name: None)
    assert triton_prefetch.prefetch_triton_key(cuda_available=True) is None
    assert triton_prefetch.find_key_function() is None


def test_a_failing_key_function_is_only_logged(monkeypatch, caplog):
    def broken():
        raise OSError("libtriton.so unreadable")

    monkeypatch.setattr(triton_prefetch, "find_key_function", lambda: broken)
    triton_prefetch._compute()   # must not raise: the first launch computes the key itself


def test_the_thread_runs_the_kernel_warm_up_after_the_key_and_survives_its_failure(monkeypatch, caplog):
    ran = []
    monkeypatch.setattr(triton_prefetch, "find_key_function", lambda: None)
    thread = triton_prefetch.prefetch_triton_key(cuda_available=True, then=lambda: ran.append("warm"))
    if thread is None:
        pytest.skip("triton is not installed here")
    thread.join(timeout=60)
    assert ran == ["warm"]

    def no_gpu():
        raise RuntimeError("no CUDA device")
    with caplog.at_level("DEBUG", logger="lowvram"):
        triton_prefetch.prefetch_triton_key(cuda_available=True, then=no_gpu).join(timeout=60)
    assert "preparing Triton ahead failed" in caplog.text


def test_the_kernel_warm_up_runs_nothing_without_fp8_units():
    from quant.kernel_warmup import warm_fp8_kernels

    assert warm_fp8_kernels("cpu") is False
