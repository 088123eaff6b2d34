"""ChunkedOffloadTextEncoder: stream a big text encoder's blocks so that ComfyUI evicts it without copying."""
from __future__ import annotations

import logging

import comfy.model_management

from .comfy_te_streaming import TextEncoderStreamingSettings, stream_text_encoder

log = logging.getLogger("lowvram")
GiB = 1 << 30


class ChunkedOffloadTextEncoder:
    DESCRIPTION = ("Streams the transformer blocks of a big text encoder (T5-XXL of Flux and SD3, Qwen3-4B of "
                   "Z-Image, Gemma; CLIP-L/G's layers beside them) from pinned host memory, keeping as many resident as the VRAM budget "
                   "allows. When the diffusion model then needs the memory, ComfyUI evicts the encoder "
                   "without copying its weights back to the host (seconds saved on every first prompt on a "
                   "card the encoder does not fit beside the model). Conditioning is bit-identical to running "
                   "without it; LoRA on the encoder works. On a machine without a GPU it passes the CLIP "
                   "through unchanged.")
    CATEGORY = "lowvram/patches"
    FUNCTION = "patch"
    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("A clone of the CLIP whose transformer blocks stream within the budget.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The text encoder(s) from a CLIP loader (T5-XXL, Qwen3-4B, Gemma; "
                              "CLIP-L/G beside them stay with ComfyUI)."}),
            "vram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.25, "tooltip":
                               "GiB of VRAM the encoder's blocks and transfer buffers may use while it encodes. "
                               "0 = auto: what is free once ComfyUI has loaded the rest of the encoder."}),
            "pin_memory": ("BOOLEAN", {"default": True, "tooltip": "Page-lock the host copy of streamed blocks: "
                           "about 5x faster transfers. Off, or if the OS refuses, pageable memory is used."}),
        }}

    def patch(self, clip, vram_budget_gb, pin_memory):
        if vram_budget_gb < 0:
            raise ValueError(f"vram_budget_gb={vram_budget_gb} is negative; use 0 for auto or a size in GiB")
        if comfy.model_management.get_torch_device().type != "cuda":
            log.warning("LowVRAM Kit ChunkedOffloadTextEncoder: no CUDA GPU here, so there is nothing to stream; "
                        "the CLIP passes through unchanged (the workflow stays portable).")
            return (clip,)
        clone, _session = stream_text_encoder(clip, TextEncoderStreamingSettings(int(vram_budget_gb * GiB),
                                                                                  pin_memory))
        return (clone,)
