"""ComfyUI adapter: the SwiGLU feed-forwards of an fp8 model run as quant.swiglu's fused path.

Next-DiT's `FeedForward` (NewBie, Z-Image, Lumina 2 in comfy/ldm/lumina/model.py) computes
w2(silu(w1(x)) * w3(x)). With fp8 layers that is eight kernels, five of them passes over memory; quant.swiglu
does it in five, two of them passes over memory, with the same bits. Each such module's `forward` is replaced through ComfyUI's object patches
(`ModelPatcher.add_object_patch`): ComfyUI sets them while the model is patched in and restores the method
when it unpatches, so clones, unloading and other patches work as for any model.

The patched forward takes the fused path only when ComfyUI's own path would hand our fp8 layers their
tensors unchanged: all three weights already on the input's device (resident, or streamed into place by
ChunkedOffloadUNet) with no weight functions (LoRA in lowvram mode), fp8 GEMM mode with per-token
activations, and inside no torch.compile graph (inductor fuses the unfused ops itself). Anything else, e.g.
a layer ComfyUI left on the CPU, runs the module's own forward.
"""
from __future__ import annotations

import functools
import logging
import os
import types

import torch

from ..quant.swiglu import Fp8Weights, fp8_swiglu, fp8_swiglu_takes

log = logging.getLogger("lowvram")

# "module.Class" of a SwiGLU feed-forward -> its (gate, up, down) Linear attribute names.
SWIGLU_CLASSES = {"comfy.ldm.lumina.model.FeedForward": ("w1", "w3", "w2")}
# Counts of calls per path in this process (tests, benchmarks): "fused", "module".
CALLS = {"fused": 0, "module": 0}
# "0" leaves every feed-forward to ComfyUI's path: the benchmarks' A/B (bench/gpu_round.sh newbie_fused).
DISABLE_ENV = "LOWVRAM_FUSED_FFN"


@functools.cache
def swiglu_names(cls: type) -> tuple[str, str, str] | None:
    """A SwiGLU feed-forward class's (gate, up, down) Linear names; None for any other class. Cached per class:
    the patched forward asks on every call (40 per NewBie model call)."""
    return SWIGLU_CLASSES.get(f"{cls.__module__}.{cls.__qualname__}")


def _fp8_ready(layer, x: torch.Tensor) -> bool:
    # The layer's own direct-path condition (LowVRAMFp8Ops.Linear.in_place_for), plus the mode the fused path needs.
    return (getattr(layer, "fp8_compute", None) == "fp8" and layer.fp8_act_scaling == "per_token"
            and layer.in_place_for(x))


def fused_swiglu_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The `forward` put on each SwiGLU FeedForward, bound to it as a method: fused where it gives the same bits,
    the module's own forward otherwise.

    One function bound to each module, not an object per module: torch.compile (CompileModelBlocks compiles a
    block class's forward once for all blocks) guards on the identity of a callable object it meets, so a
    patch object per module made one graph per block (40 on NewBie, past dynamo's recompile limit of 8, beyond
    which it runs the frame eager): the compiled fp8 pipeline stepped no faster than eager (bench/results/
    workflows_e2e_nvidia-h200_2026-11-22T1404.json, T1406). A bound method of one function shares the graph
    (tests/integration/test_fused_ffn.py) and the compiled step got 0.696-0.853x resident bf16 (T1413, T1416)."""
    if not torch.compiler.is_compiling():
        layers = [getattr(module, name) for name in swiglu_names(type(module))]   # gate, up, down
        if all(_fp8_ready(layer, x) for layer in layers):
            weights = [Fp8Weights(layer.weight, layer.weight_scale, layer.bias) for layer in layers]
            if fp8_swiglu_takes(x, *weights):
                CALLS["fused"] += 1
                # one ops class makes every fp8 layer of a model: the three share its fast_accum
                return fp8_swiglu(x, *weights, fast_accum=layers[0].fp8_fast_accum)
        CALLS["module"] += 1
    return type(module).forward(module, x)


def add_fused_ffn_patches(patcher) -> int:
    """Object-patch every SwiGLU feed-forward of the patcher's diffusion model whose three layers are our fp8
    layers; returns how many. A model with none (Flux, SDXL, or kept high-precision layers) is left as is."""
    if os.environ.get(DISABLE_ENV) == "0":
        log.info("LowVRAM Kit: %s=0, the feed-forwards run layer by layer", DISABLE_ENV)
        return 0
    dm = patcher.model.diffusion_model
    count = 0
    for name, module in dm.named_modules():
        names = swiglu_names(type(module))
        if names is None:
            continue
        if not all(getattr(getattr(module, n, None), "weight_scale", None) is not None for n in names):
            continue   # a kept (high-precision) layer among them: ComfyUI's path
        patcher.add_object_patch(f"diffusion_model.{name}.forward", types.MethodType(fused_swiglu_forward, module))
        count += 1
    if count:
        log.info("LowVRAM Kit: %d SwiGLU feed-forwards run fused where their fp8 layers are in place", count)
    return count
