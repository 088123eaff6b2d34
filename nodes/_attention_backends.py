"""Attention backends as a table, the per-model override that runs one of them, and `auto`'s probe.

No ComfyUI import here. ComfyUI calls an attention override as
`override(func, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs)`:
q/k/v are [B, L, heads*D] (or [B, heads, L, D] with skip_reshape), the result [B, L, heads*D] (or
[B, heads, L, D] with skip_output_reshape). ComfyUI's own attention functions (its registry: "pytorch",
"split", "sub_quad", and "flash"/"sage"/"xformers" when those packages import) are handed in as a dict
by the node, so this module runs without ComfyUI in the tests.

Why our own SDPA call for the exact SDPA kernels rather than `sdpa_kernel` around ComfyUI's
attention_pytorch: on Windows ComfyUI opens its own `sdpa_kernel(..., set_priority=True)` context inside,
which would re-enable every kernel and silently undo the choice.

    override = AttentionOverride("sdpa_cudnn", "fallback", comfy_functions)
    model.model_options["transformer_options"]["optimized_attention_override"] = override
"""
from __future__ import annotations

import importlib.util
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("lowvram")
ON_UNAVAILABLE = ("error", "fallback")
HALF = (torch.float16, torch.bfloat16)
SDP_BATCH_LIMIT = 2 ** 15     # CUDA SDPA kernels fail for larger batches (ComfyUI splits there too)
PROBE_MAX_TOKENS = 8192       # the probe times at most this sequence length (cost: a few ms per backend)
CALLS: Counter = Counter()    # backend name -> attention calls it served in this process (tests, bench)
PROBE_CACHE: dict[tuple, tuple[str, dict]] = {}   # (device name, dtype, head_dim) -> (choice, timings s)


@dataclass(frozen=True)
class Backend:
    name: str                           # widget value: saved in workflows, never renamed
    label: str
    kind: str                           # "sdpa": torch SDPA held to one kernel; "comfy": a ComfyUI function
    sdpa: str | None = None             # torch.nn.attention.SDPBackend member
    comfy_name: str | None = None       # name in ComfyUI's attention registry
    package: str | None = None          # optional package's import name
    pip: str | None = None              # what to pip install
    devices: tuple[str, ...] = ("cuda", "cpu")
    half_on_cuda: bool = False          # CUDA kernel takes fp16/bf16 only
    max_head_dim: int | None = None
    cuda_masks: bool = True             # False: the CUDA kernel takes no attention mask
    probe: bool = True                  # a candidate for `auto`
    note: str = ""


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("sdpa", "PyTorch SDPA (default)", "comfy", comfy_name="pytorch",
            note="ComfyUI's attention_pytorch; PyTorch picks the kernel"),
    Backend("sdpa_flash", "SDPA flash", "sdpa", sdpa="FLASH_ATTENTION", half_on_cuda=True, max_head_dim=256,
            cuda_masks=False),
    Backend("sdpa_efficient", "SDPA memory-efficient", "sdpa", sdpa="EFFICIENT_ATTENTION", devices=("cuda",)),
    Backend("sdpa_cudnn", "SDPA cuDNN", "sdpa", sdpa="CUDNN_ATTENTION", devices=("cuda",), half_on_cuda=True,
            note="about 2x SDPA flash on Hopper for Flux-sized attention"),
    Backend("sdpa_math", "SDPA math", "sdpa", sdpa="MATH", probe=False,
            note="reference; slow and holds the whole attention matrix"),
    Backend("flash_attn", "flash-attn", "comfy", comfy_name="flash", package="flash_attn", pip="flash-attn",
            devices=("cuda",), half_on_cuda=True, max_head_dim=256, cuda_masks=False),
    Backend("sage", "SageAttention", "comfy", comfy_name="sage", package="sageattention", pip="sageattention",
            devices=("cuda",), half_on_cuda=True, max_head_dim=128),
    Backend("xformers", "xformers", "comfy", comfy_name="xformers", package="xformers", pip="xformers",
            devices=("cuda",)),
    Backend("split", "split (least memory)", "comfy", comfy_name="split", probe=False,
            note="slices the attention matrix to fit free memory"),
    Backend("sub_quad", "sub-quadratic (least memory)", "comfy", comfy_name="sub_quad", probe=False,
            note="chunked attention, memory grows slower than L^2"),
)}
BACKEND_NAMES = ("auto",) + tuple(BACKENDS)


def sdpa_member(name: str):
    """torch's SDPBackend member for an "sdpa" backend, or None when this torch lacks it."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return None
    return getattr(SDPBackend, BACKENDS[name].sdpa, None)


def install_hint(name: str) -> str:
    b = BACKENDS[name]
    return (f"{b.label} is not installed: run `{sys.executable} -m pip install {b.pip}` in ComfyUI's Python "
            f"environment and restart ComfyUI, or choose another backend")


def unavailable_reason(name: str, device_type: str, comfy_functions: dict[str, Callable | None],
                       find_spec: Callable = importlib.util.find_spec) -> str | None:
    """Why backend `name` cannot run on this device/installation, or None when it can."""
    b = BACKENDS[name]
    if b.package is not None and find_spec(b.package) is None:
        return install_hint(name)
    if device_type not in b.devices:
        return f"{b.label} needs a CUDA GPU; this model runs on {device_type}"
    if b.kind == "sdpa" and sdpa_member(name) is None:
        return f"{b.label} needs a newer PyTorch (torch.nn.attention.SDPBackend.{b.sdpa}); this is {torch.__version__}"
    if b.kind == "comfy" and comfy_functions.get(b.comfy_name) is None:
        extra = " (xformers is off when ComfyUI starts with --disable-xformers)" if name == "xformers" else ""
        return (f"{b.label} is installed but this ComfyUI did not register it as attention function "
                f"{b.comfy_name!r}{extra}; check ComfyUI's startup log for its import error")
    return None


def unsupported_reason(name: str, head_dim: int, dtype: torch.dtype, device_type: str, has_mask: bool) -> str | None:
    """Why backend `name` cannot take this call's inputs, or None. Only the limits we know for sure."""
    b = BACKENDS[name]
    if b.half_on_cuda and device_type == "cuda" and dtype not in HALF:
        return f"{b.label} takes fp16/bf16 only; this model computes attention in {dtype}"
    if b.max_head_dim is not None and head_dim > b.max_head_dim:
        return f"{b.label} takes head sizes up to {b.max_head_dim}; this model's heads are {head_dim}"
    if has_mask and not b.cuda_masks and device_type == "cuda":
        return f"{b.label} takes no attention mask; this model passes one"
    return None


def head_dims_from_config(cfg: dict) -> set[int]:
    """Head sizes of a ComfyUI diffusion model from its unet_config (empty set when unknown).

    >>> sorted(head_dims_from_config({"hidden_size": 3072, "num_heads": 24}))              # Flux
    [128]
    >>> sorted(head_dims_from_config({"num_head_channels": 64, "num_heads": -1}))          # SDXL
    [64]
    >>> sorted(head_dims_from_config({"dim": 2304, "n_heads": 24}))                        # Lumina 2
    [96]
    """
    for rule in HEAD_DIM_RULES:
        dims = rule(cfg)
        if dims:
            return dims
    return set()


HEAD_DIM_RULES: tuple[Callable[[dict], set[int]], ...] = (
    lambda c: {c["hidden_size"] // c["num_heads"]} if c.get("num_heads", 0) > 0 and "hidden_size" in c else set(),
    lambda c: {c["dim"] // c["n_heads"]} if c.get("n_heads", 0) > 0 and "dim" in c else set(),
    lambda c: {c["num_head_channels"]} if c.get("num_head_channels", -1) > 0 else set(),
    lambda c: ({c["model_channels"] * m // c["num_heads"] for m in c.get("channel_mult", ())}
               if c.get("num_heads", 0) > 0 and "model_channels" in c else set()),
)


def to_heads(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """[B, L, heads*D] -> [B, heads, L, D] (skip_reshape: already that)."""
    if skip_reshape:
        return t
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads).transpose(1, 2)


def sdpa_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                   *, backend: str = "sdpa_math", **_ignored):
    """ComfyUI's attention signature, computed by torch SDPA held to one kernel (BACKENDS[backend].sdpa)."""
    from torch.nn.attention import sdpa_kernel
    q, k, v = (to_heads(t, heads, skip_reshape) for t in (q, k, v))
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask            # [L, S] -> [1, L, S]
        mask = mask.unsqueeze(1) if mask.ndim == 3 else mask            # [B, L, S] -> [B, 1, L, S]
    b = q.shape[0]
    with sdpa_kernel([sdpa_member(backend)]):
        if b <= SDP_BATCH_LIMIT:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            parts = []
            for i in range(0, b, SDP_BATCH_LIMIT):
                m = mask[i:i + SDP_BATCH_LIMIT] if (mask is not None and mask.shape[0] > 1) else mask
                sl = slice(i, i + SDP_BATCH_LIMIT)
                parts.append(F.scaled_dot_product_attention(q[sl], k[sl], v[sl], attn_mask=m))
            out = torch.cat(parts)
    if skip_output_reshape:
        return out                                                       # [B, heads, L, D]
    return out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1])       # [B, L, heads*D]


def no_kernel_error(e: BaseException) -> bool:
    """torch's "no SDPA kernel can take these inputs" error (wording changed across versions)."""
    msg = str(e)
    return isinstance(e, RuntimeError) and ("No available kernel" in msg or "No viable backend" in msg)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Seconds per call: one warm-up, then the best of `repeats` (GPU work is waited for)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def pick_fastest(timings: dict[str, float | None]) -> str:
    """The backend with the smallest time; ties go to the table's order; None = failed in the probe.

    >>> pick_fastest({"sdpa": 0.79e-3, "sdpa_cudnn": 0.41e-3, "sage": None})
    'sdpa_cudnn'
    """
    ok = {k: t for k, t in timings.items() if t is not None and math.isfinite(t)}
    if not ok:
        return "sdpa"
    order = list(BACKENDS)
    return min(ok, key=lambda k: (ok[k], order.index(k)))


class AttentionOverride:
    """The callable stored as transformer_options["optimized_attention_override"] on a model clone.

    It must survive `copy.deepcopy` (ModelPatcher.clone copies model_options): plain attributes only;
    ComfyUI's functions are module-level, copied by reference.
    """

    def __init__(self, backend: str, on_unavailable: str, comfy_functions: dict[str, Callable | None],
                 timer: Callable = time_call, find_spec: Callable = importlib.util.find_spec):
        if backend not in BACKEND_NAMES:
            raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKEND_NAMES)}")
        if on_unavailable not in ON_UNAVAILABLE:
            raise ValueError(f"on_unavailable {on_unavailable!r} is not one of {', '.join(ON_UNAVAILABLE)}")
        self.backend = backend
        self.on_unavailable = on_unavailable
        self.comfy_functions = dict(comfy_functions)
        self.timer = timer
        self.find_spec = find_spec
        self.chosen: dict[tuple, str] = {}        # (device, dtype, head_dim, has_mask) -> backend name
        self.warned: set[str] = set()

    # ---- called by ComfyUI for every attention ----------------------------------------------------------
    def __call__(self, func, *args, **kwargs):
        q, heads = args[0], (args[3] if len(args) > 3 else kwargs["heads"])
        mask = args[4] if len(args) > 4 else kwargs.get("mask")
        head_dim = q.shape[-1] if kwargs.get("skip_reshape", False) else q.shape[-1] // heads
        key = (str(q.device), q.dtype, head_dim, mask is not None)
        name = self.chosen.get(key)
        if name is None:
            name = self.chosen[key] = self._choose(q, heads, head_dim, mask is not None)
        try:
            out = self.run(name, args, kwargs)
        except RuntimeError as e:
            if not no_kernel_error(e) or name == "sdpa":
                raise
            reason = f"{BACKENDS[name].label} has no kernel for these inputs ({str(e).splitlines()[0]})"
            name = self.chosen[key] = "sdpa" if self.backend == "auto" else self._unsupported(name, reason)
            out = self.run(name, args, kwargs)
        CALLS[name] += 1
        return out

    def run(self, name: str, args: tuple, kwargs: dict):
        b = BACKENDS[name]
        if b.kind == "sdpa":
            return sdpa_attention(*args, **{**kwargs, "backend": name})
        return self.comfy_functions[b.comfy_name](*args, **kwargs)

    # ---- choosing ---------------------------------------------------------------------------------------
    def unavailable(self, name: str, device_type: str) -> str | None:
        return unavailable_reason(name, device_type, self.comfy_functions, self.find_spec)

    def _choose(self, q, heads, head_dim, has_mask) -> str:
        if self.backend == "auto":
            choice = self.probe(q, heads, head_dim)
            if unsupported_reason(choice, head_dim, q.dtype, q.device.type, has_mask):
                return "sdpa"
            return choice
        reason = self.unavailable(self.backend, q.device.type) or \
            unsupported_reason(self.backend, head_dim, q.dtype, q.device.type, has_mask)
        return self.backend if reason is None else self._unsupported(self.backend, reason)

    def _unsupported(self, name: str, reason: str) -> str:
        if self.on_unavailable == "error":
            raise ValueError(f"FlashAttnToggle: {reason}. Choose another backend, or set on_unavailable "
                             "to 'fallback' to use PyTorch SDPA instead")
        if name not in self.warned:
            self.warned.add(name)
            log.warning("FlashAttnToggle: %s; using PyTorch SDPA instead", reason)
        return "sdpa"

    def candidates(self, device_type: str, head_dim: int, dtype: torch.dtype) -> list[str]:
        return [n for n, b in BACKENDS.items() if b.probe and self.unavailable(n, device_type) is None
                and unsupported_reason(n, head_dim, dtype, device_type, has_mask=False) is None]

    def probe(self, q: torch.Tensor, heads: int, head_dim: int) -> str:
        """Fastest candidate for (device, dtype, head_dim), timed once per process on random q/k/v."""
        key = (device_name(q.device), q.dtype, head_dim)
        if key in PROBE_CACHE:
            return PROBE_CACHE[key][0]
        tokens = min(q.shape[-2] if q.ndim == 4 else q.shape[1], PROBE_MAX_TOKENS)
        g = torch.Generator(device=q.device).manual_seed(0)
        qkv = [torch.randn((1, heads, tokens, head_dim), generator=g, device=q.device, dtype=q.dtype)
               for _ in range(3)]
        timings: dict[str, float | None] = {}
        for name in self.candidates(q.device.type, head_dim, q.dtype):
            call = (lambda n=name: self.run(n, (*qkv, heads), {"skip_reshape": True, "skip_output_reshape": True,
                                                               "_inside_attn_wrapper": True}))
            try:
                timings[name] = self.timer(call, q.device)
            except (RuntimeError, ValueError, TypeError) as e:      # a kernel that cannot take these inputs
                log.debug("FlashAttnToggle probe: %s failed: %s", name, e)
                timings[name] = None
        choice = pick_fastest(timings)
        PROBE_CACHE[key] = (choice, timings)
        shown = ", ".join(f"{n} {t * 1e3:.3f} ms" if t is not None else f"{n} failed" for n, t in timings.items())
        log.info("FlashAttnToggle auto: %s for %s %s head size %d (%s)", choice, key[0], q.dtype, head_dim, shown)
        return choice
