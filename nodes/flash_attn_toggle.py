"""FlashAttnToggle: choose the attention backend per model instead of per server."""
from __future__ import annotations

from ._attention_backends import BACKEND_NAMES, ON_UNAVAILABLE


class FlashAttnToggle:
    """Clone a MODEL so its attention runs on one backend, through ComfyUI's per-model override."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model; it is cloned, never changed."}),
            "backend": (list(BACKEND_NAMES), {"default": "auto", "tooltip":
                        "auto: the fastest available here, timed once per GPU, dtype and head size. "
                        "sdpa: PyTorch's own pick. sdpa_*: one PyTorch kernel (cuDNN is often fastest on "
                        "H100/H200). flash_attn, sage, xformers: need their packages. split, sub_quad: "
                        "least memory, slower."}),
            "on_unavailable": (list(ON_UNAVAILABLE), {"default": "error", "tooltip":
                               "When the backend is missing or cannot take this model (head size, dtype, "
                               "mask): stop with a message saying how to fix it, or warn and use PyTorch SDPA."}),
        }}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A clone of the model whose attention uses the chosen backend.",)
    FUNCTION = "apply"
    CATEGORY = "lowvram/patches"
    DESCRIPTION = (
        "Picks the attention backend for this model only (ComfyUI otherwise sets it for the whole server "
        "with a start flag). Works through ComfyUI's per-model attention override, which Flux, SDXL/SD1.5 "
        "and Lumina 2 (NewBie, Z-Image) pass down to every attention call; the VAE and text encoders are "
        "not affected. auto times the available backends once on this GPU and keeps the fastest. "
        "Missing packages (flash-attn, SageAttention, xformers) are reported with the pip command.")

    def apply(self, model, backend, on_unavailable):
        from ._attention_comfy import patch_model
        return (patch_model(model, backend, on_unavailable),)
