"""FlashAttnToggle's pure logic (nodes/_attention_backends.py): the backend table, exact SDPA kernels
agreeing on the CPU, install hints, input limits, the override's dispatch and fallbacks, auto's probe.

The module is loaded from its file: the repo's `nodes` package name collides with ComfyUI's nodes.py.
"""
import copy
import doctest
import logging
import math

import pytest
import torch

from harness.pure_nodes import pure_node

A = pure_node("_attention_backends")
NOT_INSTALLED = staticmethod(lambda pkg: None)


def reference_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v in float64, q/k/v [B, H, L, D]."""
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s + mask.double()
    return (s.softmax(-1) @ v.double()).to(q.dtype)


def comfy_like_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                       skip_output_reshape=False, **kwargs):
    """Stands in for ComfyUI's attention_pytorch (same contract) in these pure tests."""
    return A.sdpa_attention(q, k, v, heads, mask, skip_reshape=skip_reshape,
                            skip_output_reshape=skip_output_reshape, backend="sdpa_math")


FUNCS = {"pytorch": comfy_like_pytorch, "split": comfy_like_pytorch, "sub_quad": comfy_like_pytorch,
         "flash": None, "sage": None, "xformers": None}


def test_docstring_examples():
    assert doctest.testmod(A).failed == 0


def test_table_names_are_the_widget_values():
    assert A.BACKEND_NAMES == ("auto", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math",
                               "flash_attn", "sage", "xformers", "split", "sub_quad")
    for b in A.BACKENDS.values():
        assert (b.kind == "sdpa") == (b.sdpa is not None) and (b.kind == "comfy") == (b.comfy_name is not None)
        assert (b.package is None) == (b.pip is None)
    assert not A.BACKENDS["sdpa_math"].probe and not A.BACKENDS["split"].probe   # auto never picks slow ones


# ---- numerics: the exact kernels agree on the CPU --------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("backend", ["sdpa_math", "sdpa_flash"])
@pytest.mark.parametrize("skip_reshape,skip_output_reshape", [(False, False), (True, True), (True, False)])
def test_sdpa_kernels_match_the_reference(backend, dtype, tol, skip_reshape, skip_output_reshape):
    g = torch.Generator().manual_seed(0)
    b, h, lq, lk, d = 2, 3, 37, 29, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk))
    ref = reference_attention(q, k, v)
    args = (q, k, v) if skip_reshape else tuple(t.transpose(1, 2).reshape(b, t.shape[2], h * d) for t in (q, k, v))
    out = A.sdpa_attention(*args, h, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                           backend=backend, transformer_options={}, _inside_attn_wrapper=True)
    if not skip_output_reshape:
        assert out.shape == (b, lq, h * d)
        out = out.reshape(b, lq, h, d).transpose(1, 2)
    assert out.shape == ref.shape and out.dtype == dtype
    assert (out.float() - ref.float()).abs().max() < tol


def test_masks_reach_the_kernel():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
    mask = torch.zeros(8, 8)
    mask[:, 4:] = -math.inf                      # [L, S]: the first 4 keys only
    out = A.sdpa_attention(q, k, v, 2, mask, skip_reshape=True, skip_output_reshape=True, backend="sdpa_math")
    assert torch.allclose(out, reference_attention(q, k[..., :4, :], v[..., :4, :]), atol=1e-5)
    # PyTorch's CPU flash kernel takes masks (its CUDA one does not: see the limits test)
    out = A.sdpa_attention(q, k, v, 2, mask, skip_reshape=True, skip_output_reshape=True, backend="sdpa_flash")
    assert torch.allclose(out, reference_attention(q, k[..., :4, :], v[..., :4, :]), atol=1e-5)
    with pytest.raises(RuntimeError) as err:      # a kernel this machine lacks: torch refuses
        A.sdpa_attention(q, k, v, 2, mask, skip_reshape=True, skip_output_reshape=True, backend="sdpa_cudnn")
    assert A.no_kernel_error(err.value)


# ---- availability, install hints, input limits ------------------------------------------------------------
@pytest.mark.parametrize("name,pip", [("flash_attn", "flash-attn"), ("sage", "sageattention"), ("xformers", "xformers")])
def test_a_missing_package_gives_its_pip_command(name, pip):
    reason = A.unavailable_reason(name, "cuda", FUNCS, find_spec=lambda pkg: None)
    assert f"-m pip install {pip}" in reason and "restart ComfyUI" in reason and A.BACKENDS[name].label in reason


def test_installed_but_not_registered_and_cuda_only_kernels():
    reason = A.unavailable_reason("xformers", "cuda", FUNCS, find_spec=lambda pkg: object())
    assert "did not register" in reason and "--disable-xformers" in reason
    assert "needs a CUDA GPU" in A.unavailable_reason("sdpa_cudnn", "cpu", FUNCS)
    assert A.unavailable_reason("sdpa_flash", "cpu", FUNCS) is None
    assert A.unavailable_reason("sdpa", "cpu", FUNCS) is None


def test_input_limits_are_named():
    assert "head sizes up to 256" in A.unsupported_reason("sdpa_flash", 512, torch.bfloat16, "cuda", False)
    assert "fp16/bf16 only" in A.unsupported_reason("sdpa_cudnn", 128, torch.float32, "cuda", False)
    assert "no attention mask" in A.unsupported_reason("flash_attn", 128, torch.float16, "cuda", True)
    assert "no attention mask" in A.unsupported_reason("sdpa_flash", 128, torch.float16, "cuda", True)
    assert A.unsupported_reason("sdpa_flash", 128, torch.float32, "cpu", True) is None
    assert A.unsupported_reason("sdpa_flash", 128, torch.float32, "cpu", False) is None   # CPU flash takes fp32
    assert A.unsupported_reason("sdpa_efficient", 512, torch.float32, "cuda", True) is None


def test_head_dims_of_sd15_style_configs():
    cfg = {"model_channels": 320, "num_heads": 8, "num_head_channels": -1, "channel_mult": [1, 2, 4, 4]}
    assert A.head_dims_from_config(cfg) == {40, 80, 160}
    assert A.head_dims_from_config({"unknown": 1}) == set()


# ---- the override as ComfyUI calls it ---------------------------------------------------------------------
def qkv(b=1, h=2, n=16, d=8, seed=0, layout="BLC"):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(b, h, n, d, generator=g) for _ in range(3)]
    return t if layout == "BHLD" else [x.transpose(1, 2).reshape(b, n, h * d) for x in t]


def call(override, *args, **kwargs):
    # what comfy's wrap_attn does: marks the call, then hands it to the override with the original func
    return override(comfy_like_pytorch, *args, _inside_attn_wrapper=True, transformer_options={}, **kwargs)


def test_exact_backends_agree_through_the_override():
    q, k, v = qkv()
    ref = call(A.AttentionOverride("sdpa_math", "error", FUNCS), q, k, v, 2)
    for name in ("sdpa", "sdpa_flash", "split", "sub_quad"):
        A.CALLS.clear()
        out = call(A.AttentionOverride(name, "error", FUNCS), q, k, v, 2)
        assert torch.allclose(out, ref, atol=2e-5), name
        assert A.CALLS == {name: 1}


def test_unavailable_backend_errors_or_falls_back_once_with_a_warning(caplog):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="pip install sageattention.*fallback"):
        call(A.AttentionOverride("sage", "error", FUNCS, find_spec=lambda p: None), q, k, v, 2)
    o = A.AttentionOverride("sage", "fallback", FUNCS, find_spec=lambda p: None)
    A.CALLS.clear()
    with caplog.at_level(logging.WARNING, logger="lowvram"):
        for _ in range(3):
            call(o, q, k, v, 2)
    assert A.CALLS == {"sdpa": 3}
    assert sum("pip install sageattention" in r.message for r in caplog.records) == 1


def test_inputs_the_backend_cannot_take_error_or_fall_back(monkeypatch):
    # Pretend the flash kernel takes no masks on this device (as on CUDA): the override must see the mask
    # whether it comes as a keyword or positionally.
    monkeypatch.setattr(A, "unsupported_reason", lambda n, d, dt, dev, m: "SDPA flash takes no attention mask"
                        if (m and n == "sdpa_flash") else None)
    q, k, v = qkv()
    mask = torch.zeros(16, 16)
    with pytest.raises(ValueError, match="no attention mask"):
        call(A.AttentionOverride("sdpa_flash", "error", FUNCS), q, k, v, 2, mask=mask)
    A.CALLS.clear()
    out = call(A.AttentionOverride("sdpa_flash", "fallback", FUNCS), q, k, v, 2, mask)   # mask positional
    assert A.CALLS == {"sdpa": 1} and out.shape == q.shape


def test_a_runtime_no_kernel_error_is_caught_and_other_errors_are_not():
    q, k, v = qkv()

    def no_kernel(*a, **kw):
        raise RuntimeError("No available kernel. Aborting execution.")

    def broken(*a, **kw):
        raise RuntimeError("CUDA error: an illegal memory access")

    funcs = {**FUNCS, "split": no_kernel}
    A.CALLS.clear()
    call(A.AttentionOverride("split", "fallback", funcs), q, k, v, 2)
    assert A.CALLS == {"sdpa": 1}
    with pytest.raises(RuntimeError, match="illegal memory"):
        call(A.AttentionOverride("split", "fallback", {**FUNCS, "split": broken}), q, k, v, 2)


def test_override_survives_deepcopy_as_model_clone_does():
    o = A.AttentionOverride("sdpa_flash", "error", FUNCS)
    c = copy.deepcopy(o)
    q, k, v = qkv()
    assert torch.allclose(call(c, q, k, v, 2), call(o, q, k, v, 2))
    assert c.comfy_functions["pytorch"] is comfy_like_pytorch


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="not one of"):
        A.AttentionOverride("flash3", "error", FUNCS)
    with pytest.raises(ValueError, match="on_unavailable"):
        A.AttentionOverride("auto", "ignore", FUNCS)


# ---- auto: probe, pick, cache ----------------------------------------------------------------------------
def test_pick_fastest_ignores_failures_and_breaks_ties_by_table_order():
    assert A.pick_fastest({"sdpa": 2.0, "sdpa_flash": 1.0, "sage": None}) == "sdpa_flash"
    assert A.pick_fastest({"xformers": 1.0, "sdpa_cudnn": 1.0}) == "sdpa_cudnn"
    assert A.pick_fastest({"sage": None}) == "sdpa"
    assert A.pick_fastest({}) == "sdpa"


def test_auto_probes_once_per_device_dtype_and_head_size_and_uses_the_fastest(monkeypatch):
    monkeypatch.setattr(A, "PROBE_CACHE", {})
    fake_ms = {"sdpa": 3.0, "sdpa_flash": 1.0}
    probed = []

    def timer(fn, device):
        fn()                                     # the candidate really runs on the probe's q/k/v
        name = timer.names.pop(0)
        probed.append(name)
        return fake_ms[name] * 1e-3

    o = A.AttentionOverride("auto", "error", FUNCS, timer=timer)
    timer.names = o.candidates("cpu", 8, torch.float32)
    assert timer.names == ["sdpa", "sdpa_flash"]       # CPU: no cuDNN/efficient, no packages
    A.CALLS.clear()
    for _ in range(3):
        call(o, *qkv(), 2)
    other = A.AttentionOverride("auto", "error", FUNCS, timer=timer)   # a second model: cached probe
    call(other, *qkv(), 2)
    assert probed == ["sdpa", "sdpa_flash"] and A.CALLS == {"sdpa_flash": 4}
    choice, timings = A.PROBE_CACHE[("cpu", torch.float32, 8)]
    assert choice == "sdpa_flash" and timings == {"sdpa": 3e-3, "sdpa_flash": 1e-3}
    # a masked call is resolved on its own (CPU flash takes masks; on CUDA it would go to PyTorch SDPA)
    A.CALLS.clear()
    call(o, *qkv(), 2, mask=torch.zeros(16, 16))
    assert A.CALLS == {"sdpa_flash": 1} and ("cpu", torch.float32, 8, True) in o.chosen


def test_auto_skips_a_candidate_that_fails_in_the_probe(monkeypatch):
    monkeypatch.setattr(A, "PROBE_CACHE", {})

    def failing_flash(fn, device):
        if "flash" in failing_flash.current:
            raise RuntimeError("No available kernel")
        return 1.0

    o = A.AttentionOverride("auto", "error", FUNCS)
    names = o.candidates("cpu", 8, torch.float32)

    def timer(fn, device):
        failing_flash.current = names.pop(0)
        return failing_flash(fn, device)

    o.timer = timer
    call(o, *qkv(), 2)
    assert A.PROBE_CACHE[("cpu", torch.float32, 8)] == ("sdpa", {"sdpa": 1.0, "sdpa_flash": None})


def test_real_timer_runs_on_cpu():
    t = A.time_call(lambda: torch.ones(4) * 2, torch.device("cpu"), repeats=2)
    assert 0 < t < 1.0
