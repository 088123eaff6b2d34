"""NewBieTextEncoderLoader: Gemma-3-4B-it + Jina CLIP v2 as one CLIP, with fp8 / NF4 weights or on the CPU."""
from __future__ import annotations

import folder_paths

from .comfy_newbie_text import DEVICES, WEIGHT_FORMATS, NewBieTEConfig, load_newbie_text_encoders


class NewBieTextEncoderLoader:
    DESCRIPTION = ("Loads NewBie-image's two text encoders as one CLIP: Gemma-3-4B-it (caption features, second-to-"
                   "last layer) and Jina CLIP v2's text tower (the pooled vector NewBie's DiT also reads). Reads "
                   "ComfyUI's repacks (gemma_3_4b_it_bf16, jina_clip_v2_bf16) and the Hugging Face files "
                   "(tokenizer.model / tokenizer.json beside them). No download, no remote code.")
    CATEGORY = "lowvram/newbie"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("Both encoders; use it with NewBieTextEncode (or CLIPTextEncode).",)

    @classmethod
    def INPUT_TYPES(cls):
        files = folder_paths.get_filename_list("text_encoders")
        return {"required": {
            "gemma_name": (files, {"tooltip": "Gemma-3-4B-it from models/text_encoders: ComfyUI's "
                                   "gemma_3_4b_it_bf16.safetensors, or the Hugging Face model-00001-of-0000N file "
                                   "(its other shards and tokenizer.model beside it)."}),
            "jina_name": (files, {"tooltip": "Jina CLIP v2 from models/text_encoders: ComfyUI's "
                                  "jina_clip_v2_bf16.safetensors, or jinaai/jina-clip-v2's model.safetensors "
                                  "(tokenizer.json beside it)."}),
            "weight_format": (list(WEIGHT_FORMATS), {"default": "default", "tooltip": "default: as stored (bf16). "
                              "fp8: per-channel fp8 Linear weights, about 60% of the memory (Gemma 7.8 -> 4.6 GB). nf4: "
                              "4-bit, needs the bitsandbytes package (Gemma -> 3 GB)."}),
            "device": (list(DEVICES), {"default": "default", "tooltip": "default: the GPU, as ComfyUI places text "
                       "encoders. cpu: keep both on the CPU (no VRAM used; slower prompts)."}),
        }}

    def load(self, gemma_name, jina_name, weight_format, device):
        cfg = NewBieTEConfig(weight_format=weight_format, device=device)
        paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in (gemma_name, jina_name)]
        clip = load_newbie_text_encoders(*paths, cfg, folder_paths.get_folder_paths("embeddings"))
        return (clip,)
