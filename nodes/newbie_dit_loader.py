"""NewBieDiTLoader: NewBie-image's DiT in bf16 (or fp32) through ComfyUI's loader, with its Jina pooled path."""
from __future__ import annotations

import asyncio

import folder_paths
import torch

from .comfy_newbie_dit import build_newbie_dit, read_newbie_file

WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp32": torch.float32}


class NewBieDiTLoader:
    DESCRIPTION = ("Loads NewBie-image Exp0.1's diffusion model completely (36-layer Next-DiT plus the Jina pooled "
                   "path that ComfyUI 0.3.x drops). For fp8 weights use Float8DiTLoader, which does the same.")
    CATEGORY = "lowvram/newbie"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The NewBie diffusion model (flow, shift 6): sample with CFG 4-5, 18-28 steps.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (folder_paths.get_filename_list("diffusion_models"), {"tooltip": "NewBie's DiT from "
                          "models/diffusion_models, e.g. NewBie-Image-Exp0.1.safetensors (Hugging Face's "
                          "transformer/diffusion_pytorch_model.safetensors, renamed)."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": "default: ComfyUI's choice "
                             "for the device (bf16 on GPUs). fp32 doubles the memory."}),
        }}

    async def load(self, unet_name, weight_dtype):
        # async like Float8DiTLoader: the file is read in a worker thread while ComfyUI runs the text encoder's
        # nodes; ComfyUI's model is built back on the prompt's thread.
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype={weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        read = await asyncio.to_thread(read_newbie_file, path)
        return (build_newbie_dit(path, read, WEIGHT_DTYPES[weight_dtype]),)
