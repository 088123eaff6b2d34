"""CompileModelBlocks: torch.compile every block of the diffusion model (bit-exact), not the whole model."""
from __future__ import annotations

import logging

import comfy.model_management

from .comfy_block_compile import MODES, compile_blocks

log = logging.getLogger("lowvram")


class CompileModelBlocks:
    DESCRIPTION = ("Compiles each block of the diffusion model (Flux double/single blocks, Next-DiT layers, SDXL "
                   "UNet blocks) with torch.compile, through ComfyUI's own compile wrapper. Unlike compiling the "
                   "whole model, each compiled block computes exactly what the eager block does. The first run "
                   "of each resolution compiles for tens of seconds. For models that stay in VRAM (not with "
                   "ChunkedOffloadUNet). On a machine without a GPU it passes the model through unchanged.")
    CATEGORY = "lowvram/patches"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model whose blocks run compiled.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model (Flux, Next-DiT, SDXL), e.g. from Float8DiTLoader."}),
            "mode": (list(MODES), {"default": "default", "tooltip": "torch.compile mode. max-autotune-no-cudagraphs "
                     "tries more kernel variants: longer first run, sometimes faster steps."}),
        }}

    def patch(self, model, mode):
        if comfy.model_management.get_torch_device().type != "cuda":
            log.warning("LowVRAM Kit CompileModelBlocks: no CUDA GPU here; the model passes through uncompiled "
                        "(the workflow stays portable).")
            return (model,)
        return (compile_blocks(model, mode),)
