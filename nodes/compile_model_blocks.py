"""CompileModelBlocks: torch.compile every block of the diffusion model (bit-exact), not the whole model."""
from __future__ import annotations

import logging

import comfy.model_management

from .comfy_block_compile import MODES, compile_blocks

log = logging.getLogger("lowvram")


class CompileModelBlocks:
    DESCRIPTION = ("Compiles each block of the diffusion model (Flux double/single blocks, Next-DiT layers, SDXL "
                   "UNet blocks) with torch.compile, through ComfyUI's own compile wrapper. Unlike compiling the "
                   "whole model, nothing outside the blocks is compiled: bf16 blocks compute exactly what eager "
                   "blocks do; in fp8 blocks the activation quantization fuses with the ops before it, which moved "
                   "Flux-dev's output by about half of fp8's own error. On an H200, Float8DiTLoader's Flux-dev ran "
                   "at 0.63x the time of ComfyUI bf16 with it, 0.84x without. The first run of each resolution "
                   "compiles for tens of seconds. Works with ChunkedOffloadUNet in either order (the streamer then "
                   "compiles each block's forward, its transfers staying outside). On a machine without a GPU it "
                   "passes the model through unchanged.")
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
