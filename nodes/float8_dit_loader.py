"""Float8DiTLoader: a diffusion model with fp8 weights and per-channel scales, fp8 matmul where the GPU has it."""
from __future__ import annotations

import asyncio
import os

import folder_paths

from ..quant import FP8_FORMATS, GRANULARITIES, QuantConfig
from .comfy_fp8_loading import Fp8LoadConfig, build_fp8_model, read_fp8_file

CKPT_TAG = "checkpoints/"  # entries from models/checkpoints: their diffusion model is taken
# Widget value -> (quant.QuantConfig.compute, the fp8 GEMMs' fast accumulation). Values are saved in workflows:
# new ones go last, none is renamed.
COMPUTE_CHOICES = {"auto": ("auto", False), "fp8_matmul": ("fp8", False), "bf16_dequant": ("dequant", False),
                   "auto_fast_accum": ("auto", True)}
# Set to 1 in the server's environment: the file is read on the prompt's thread, as before the loader was
# async, so that the two can be measured against each other on one machine.
SERIAL_LOAD_ENV = "LOWVRAM_SERIAL_LOAD"


def model_choices() -> list[str]:
    return (folder_paths.get_filename_list("diffusion_models")
            + [CKPT_TAG + n for n in folder_paths.get_filename_list("checkpoints")])


def resolve_path(name: str) -> str:
    if name.startswith(CKPT_TAG):
        return folder_paths.get_full_path_or_raise("checkpoints", name[len(CKPT_TAG):])
    return folder_paths.get_full_path_or_raise("diffusion_models", name)


def quantized_copy_path(src: str, cfg: QuantConfig) -> str:
    stem = os.path.splitext(os.path.basename(src))[0]
    folder = folder_paths.get_folder_paths("diffusion_models")[0]
    return os.path.join(folder, f"{stem}.lowvram-{cfg.fmt}-{cfg.granularity}.safetensors")


class Float8DiTLoader:
    DESCRIPTION = ("Loads a diffusion model (Flux, Next-DiT: Lumina-2/NewBie/Z-Image, SDXL) with fp8 weights and "
                   "per-channel scales, quantizing a bf16/fp16 file tensor by tensor as it streams from disk. "
                   "Computes with fp8 matmul on GPUs that have it (RTX 40xx, H100 and newer), in bf16 elsewhere. "
                   "Also reads ComfyUI's scaled-fp8 files, plain fp8 files and its own saved copies. The file is "
                   "read in the background while ComfyUI runs the text encoder's nodes.")
    CATEGORY = "lowvram/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The diffusion model, usable like any ComfyUI model (samplers, LoRA, offloading).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (model_choices(), {"tooltip": "A file from models/diffusion_models, or an all-in-one "
                                             "checkpoint from models/checkpoints (its diffusion model is used)."}),
            "fp8_format": (list(FP8_FORMATS), {"default": "e4m3fn", "tooltip": "e4m3fn: more precision (default). "
                                               "e5m2: more range, less precision."}),
            "scale_granularity": (list(GRANULARITIES), {"default": "per_channel", "tooltip": "per_channel: one "
                                  "scale per output channel (most accurate). per_tensor: one per layer. none: "
                                  "plain cast, like ComfyUI's fp8 weight dtype."}),
            "compute": (list(COMPUTE_CHOICES), {"default": "auto", "tooltip": "auto: fp8 matmul where the GPU has "
                        "fp8 units, else bf16. bf16_dequant: always upcast the weight for each matmul. "
                        "auto_fast_accum: as auto, with the fp8 matmul's fast accumulation (NewBie's DiT: 3% faster "
                        "on an H200, its error against bf16 as large as auto's; see the README)."}),
            "high_precision_layers": ("STRING", {"default": "auto", "tooltip": "Layers kept in bf16: 'auto' (the "
                                      "family's embedders, norms, final layer...), or comma-separated regular "
                                      "expressions of layer names; 'auto, <regex>' adds to the default."}),
            "save_quantized_copy": ("BOOLEAN", {"default": False, "tooltip": "Keep the fp8 model as a file next "
                                    "to your diffusion models (<name>.lowvram-<format>-<scales>.safetensors): "
                                    "written on the first load, loaded instead of quantizing on later ones "
                                    "while the source file and these settings are unchanged."}),
        }}

    async def load(self, model_name, fp8_format, scale_granularity, compute, high_precision_layers,
                   save_quantized_copy):
        # async: ComfyUI starts a ready async node before the others and, while it awaits, runs the nodes that
        # do not depend on it. The file is read and quantized in a worker thread meanwhile (asyncio.to_thread
        # carries the node's context along, so the progress bar and interrupts work), overlapping the text
        # encoder's loading and encoding; ComfyUI's model is built back on the prompt's thread.
        if compute not in COMPUTE_CHOICES:
            raise ValueError(f"compute={compute!r} is not one of {', '.join(COMPUTE_CHOICES)}")
        mode, fast_accum = COMPUTE_CHOICES[compute]
        qcfg = QuantConfig(fmt=fp8_format, granularity=scale_granularity, compute=mode)
        path = resolve_path(model_name)
        cfg = Fp8LoadConfig(qcfg, high_precision_layers,
                            quantized_copy_path(path, qcfg) if save_quantized_copy else None, fast_accum)
        if os.environ.get(SERIAL_LOAD_ENV) == "1":   # for A/B measurements (bench/gpu_round.sh load_ab24)
            source = read_fp8_file(path, cfg)
        else:
            source = await asyncio.to_thread(read_fp8_file, path, cfg)
        model, _report = build_fp8_model(source)
        return (model,)
