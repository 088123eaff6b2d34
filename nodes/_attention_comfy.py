"""FlashAttnToggle's contact with ComfyUI: its attention registry, the model's device/dtype/head size,
and the clone that carries the override.

ComfyUI (0.3.64 and 0.3.75 alike) wraps every attention function with `wrap_attn`, which hands the call
to `transformer_options["optimized_attention_override"]` when a model's options carry one. Checked in
0.3.75 that the families we target pass transformer_options down to that call: Flux (ldm/flux/math.py
attention), SDXL/SD1.5 (openaimodel -> SpatialTransformer -> CrossAttention) and Lumina 2 / NewBie /
Z-Image (ldm/lumina/model.py JointAttention); tests run each through the override.
"""
from __future__ import annotations

import logging

from ._attention_backends import (AttentionOverride, head_dims_from_config, unavailable_reason,
                                  unsupported_reason)

log = logging.getLogger("lowvram")
OVERRIDE_KEY = "optimized_attention_override"
COMFY_NAMES = ("pytorch", "split", "sub_quad", "flash", "sage", "xformers")


def comfy_attention_functions() -> dict:
    """ComfyUI's registered attention functions by name (None where not registered)."""
    import comfy.ldm.modules.attention as attention
    if not hasattr(attention, "wrap_attn") or not hasattr(attention, "get_attention_function"):
        raise RuntimeError("FlashAttnToggle: this ComfyUI has no per-model attention override "
                           "(comfy/ldm/modules/attention.py lacks wrap_attn / optimized_attention_override); "
                           "update ComfyUI, or pick the backend with its --use-*-attention start flags")
    return {n: attention.get_attention_function(n, default=None) for n in COMFY_NAMES}


def compute_dtype(model):
    base = model.model
    return getattr(base, "manual_cast_dtype", None) or base.get_dtype()


def patch_model(model, backend: str, on_unavailable: str):
    """A clone of `model` whose attention runs on `backend`; the incoming model is left as it was."""
    functions = comfy_attention_functions()
    device_type = model.load_device.type
    name = backend
    if backend != "auto":
        reason = unavailable_reason(backend, device_type, functions)
        cfg = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
        for head_dim in sorted(head_dims_from_config(cfg)):
            reason = reason or unsupported_reason(backend, head_dim, compute_dtype(model), device_type, False)
        if reason is not None:
            if on_unavailable == "error":
                raise ValueError(f"FlashAttnToggle: {reason}. Or set on_unavailable to 'fallback' to use "
                                 "PyTorch SDPA instead")
            log.warning("FlashAttnToggle: %s; using PyTorch SDPA instead", reason)
            name = "sdpa"
    override = AttentionOverride(name, on_unavailable, functions)
    patched = model.clone()     # clone() deep-copies model_options: the input model keeps its own
    options = patched.model_options.setdefault("transformer_options", {})
    if OVERRIDE_KEY in options:
        log.warning("FlashAttnToggle: this model already had an attention override from an earlier node; "
                    "it is replaced on the clone (place FlashAttnToggle before that node to keep both)")
    options[OVERRIDE_KEY] = override
    return patched
