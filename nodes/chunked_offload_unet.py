"""ChunkedOffloadUNet: keep what the VRAM budget allows resident, stream the other blocks from pinned memory."""
from __future__ import annotations

import logging

import comfy.model_management

from .comfy_block_streaming import StreamingSettings, stream_blocks

log = logging.getLogger("lowvram")
GiB = 1 << 30


class ChunkedOffloadUNet:
    DESCRIPTION = ("Streams the diffusion model's blocks (Flux double/single blocks, Next-DiT layers, SDXL UNet "
                   "blocks) from pinned host memory on a side CUDA stream, prefetching ahead so compute does not "
                   "wait, and keeps as many blocks resident as the VRAM budget allows. Outputs are bit-identical "
                   "to running without it. Works with Float8DiTLoader's fp8 weights (streams 1 byte per weight) "
                   "and with LoRA. On a machine without a GPU it passes the model through unchanged.")
    CATEGORY = "lowvram/patches"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model whose blocks stream within the budget.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to stream (Flux, Next-DiT, SDXL)."}),
            "vram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.25, "tooltip":
                               "GiB of VRAM the model's blocks, transfer buffers and activations may use. "
                               "0 = auto: what is free when sampling starts, minus the activation estimate "
                               "and a margin. A budget below the model's floor (transfer slots + activations "
                               "for this resolution and batch + margin) is refused before the first step, "
                               "with the smallest budget that works."}),
            "chunk_size": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Blocks moved per transfer. "
                           "0 = auto (chosen from the measured bytes per block and compute time)."}),
            "prefetch": ("INT", {"default": 0, "min": 0, "max": 8, "tooltip": "Transfers in flight ahead of "
                         "compute. 0 = auto."}),
            "pin_memory": ("BOOLEAN", {"default": True, "tooltip": "Page-lock the host copy of streamed blocks: "
                           "about 5x faster transfers. Off, or if the OS refuses, pageable memory is used."}),
        }, "optional": {
            # Optional, after the others: workflows saved before it existed load unchanged (default on).
            "cuda_graphs": ("BOOLEAN", {"default": True, "tooltip": "While every block is resident, capture each "
                            "model call once in a CUDA graph and replay it: the same output bits, without the "
                            "CPU issuing each GPU kernel of every step (faster where the CPU limits a step, e.g. "
                            "one image per call). Next-DiT models (NewBie, Lumina-2, Z-Image) only; a call the "
                            "graph cannot hold runs as usual, and the log says why."}),
        }}

    def patch(self, model, vram_budget_gb, chunk_size, prefetch, pin_memory, cuda_graphs=True):
        if vram_budget_gb < 0:
            raise ValueError(f"vram_budget_gb={vram_budget_gb} is negative; use 0 for auto or a size in GiB")
        if comfy.model_management.get_torch_device().type != "cuda":
            log.warning("LowVRAM Kit ChunkedOffloadUNet: no CUDA GPU here, so there is nothing to stream; the "
                        "model passes through unchanged (the workflow stays portable).")
            return (model,)
        settings = StreamingSettings(int(vram_budget_gb * GiB), chunk_size, prefetch, pin_memory, bool(cuda_graphs))
        clone, _session = stream_blocks(model, settings)
        return (clone,)
