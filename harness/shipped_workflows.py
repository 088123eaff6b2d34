"""The shipped workflows, described compactly; `python -m harness.shipped_workflows` rewrites workflows/.

Each description becomes a UI-format JSON file through workflow_builder against a live server's
/object_info (started here with the pack loaded), so the files match the real node schemas. Settings come
from bench/ measurements; the note in each file names the model files, their folders and the card tier.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .paths import REPO_ROOT
from .server import ComfyServer, ServerConfig
from .workflow_builder import GraphSpec, NodeSpec, build_ui

HF = "https://huggingface.co"
SDXL_CKPT = {"name": "sd_xl_base_1.0.safetensors", "directory": "checkpoints",
             "url": f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"}

FLUX_DEV = {"name": "flux1-dev.safetensors", "directory": "diffusion_models",
            "url": f"{HF}/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"}
CLIP_L = {"name": "clip_l.safetensors", "directory": "text_encoders",
          "url": f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"}
T5XXL = {"name": "t5xxl_fp16.safetensors", "directory": "text_encoders",
         "url": f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"}
FLUX_AE = {"name": "ae.safetensors", "directory": "vae",
           "url": f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors"}

POSITIVE = "a lighthouse on a cliff at dusk, volumetric light, detailed, 35mm photo"
NEGATIVE = "blurry, low quality, watermark"


def sdxl_24gb() -> GraphSpec:
    note = ("## SDXL on a 24 GB card\n\nModel: `sd_xl_base_1.0.safetensors` (6.9 GB) in `models/checkpoints/`.\n\n"
            "SDXL's UNet (5.1 GB fp16), both CLIPs and the VAE fit a 24 GB card resident, so this graph uses "
            "ComfyUI's own nodes only; the 12 and 16 GB variants use the LowVRAM Kit nodes.\n\n"
            "1024x1024, 25 steps, euler, CFG 6.")
    return GraphSpec(nodes=[
        NodeSpec(1, "CheckpointLoaderSimple", {"ckpt_name": SDXL_CKPT["name"]}, properties={"models": [SDXL_CKPT]}),
        NodeSpec(2, "CLIPTextEncode", {"text": POSITIVE}, links={"clip": (1, 1)}, title="Positive", size=(400, 160)),
        NodeSpec(3, "CLIPTextEncode", {"text": NEGATIVE}, links={"clip": (1, 1)}, title="Negative", size=(400, 160)),
        NodeSpec(4, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        NodeSpec(5, "KSampler", {"seed": 42, "steps": 25, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal",
                                 "denoise": 1.0},
                 links={"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)}),
        NodeSpec(6, "VAEDecode", links={"samples": (5, 0), "vae": (1, 2)}),
        NodeSpec(7, "SaveImage", {"filename_prefix": "lowvram_sdxl"}, links={"images": (6, 0)}),
    ], notes=[("Read me", note, (40, 700))])


def flux_dev_24gb() -> GraphSpec:
    note = ("## Flux.1-dev on a 24 GB card\n\nModels: `flux1-dev.safetensors` (23.8 GB, bf16) in "
            "`models/diffusion_models/`; `clip_l.safetensors` and `t5xxl_fp16.safetensors` in "
            "`models/text_encoders/`; `ae.safetensors` in `models/vae/`.\n\n"
            "Float8DiTLoader quantizes the bf16 file to fp8 with per-channel scales while it loads (11.1 GiB "
            "resident) and computes with fp8 matmul on RTX 40xx / H100 and newer; the whole model stays on a "
            "24 GB card. Tick save_quantized_copy once to write an fp8 copy that loads faster.\n\n"
            "1024x1024, 20 steps, euler/simple, guidance 3.5.")
    return GraphSpec(nodes=[
        NodeSpec(1, "Float8DiTLoader", {"model_name": FLUX_DEV["name"]}, properties={"models": [FLUX_DEV]},
                 size=(340, 200)),
        NodeSpec(2, "DualCLIPLoader", {"clip_name1": CLIP_L["name"], "clip_name2": T5XXL["name"], "type": "flux"},
                 properties={"models": [CLIP_L, T5XXL]}),
        NodeSpec(3, "CLIPTextEncode", {"text": POSITIVE}, links={"clip": (2, 0)}, title="Prompt", size=(400, 160)),
        NodeSpec(4, "FluxGuidance", {"guidance": 3.5}, links={"conditioning": (3, 0)}),
        NodeSpec(5, "ConditioningZeroOut", links={"conditioning": (3, 0)}, title="Negative (unused at CFG 1)"),
        NodeSpec(6, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        NodeSpec(7, "KSampler", {"seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                                 "denoise": 1.0},
                 links={"model": (1, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)}),
        NodeSpec(8, "VAELoader", {"vae_name": FLUX_AE["name"]}, properties={"models": [FLUX_AE]}),
        NodeSpec(9, "VAEDecode", links={"samples": (7, 0), "vae": (8, 0)}),
        NodeSpec(10, "SaveImage", {"filename_prefix": "lowvram_flux"}, links={"images": (9, 0)}),
    ], notes=[("Read me", note, (40, 760))])


NEWBIE_DIT = {"name": "NewBie-Image-Exp0.1.safetensors", "directory": "diffusion_models",
              "url": f"{HF}/NewBie-AI/NewBie-image-Exp0.1/resolve/main/transformer/diffusion_pytorch_model.safetensors"}
NEWBIE_GEMMA, NEWBIE_JINA = "gemma_3_4b_it_bf16.safetensors", "jina_clip_v2_bf16.safetensors"
NEWBIE_NEGATIVE = "low quality, worst quality, blurry, jpeg artifacts, bad anatomy"


def newbie_16gb() -> GraphSpec:
    note = ("## NewBie-image Exp0.1 on a 16 GB card\n\nModels: `NewBie-Image-Exp0.1.safetensors` (7.0 GB bf16: "
            "NewBie-AI/NewBie-image-Exp0.1's `transformer/diffusion_pytorch_model.safetensors`, renamed) in "
            "`models/diffusion_models/`; `gemma_3_4b_it_bf16.safetensors` (7.8 GB) and "
            "`jina_clip_v2_bf16.safetensors` (1.1 GB), ComfyUI repacks with their tokenizers inside "
            "(woctordho/comfyui-gemma-3-4b-it, woctordho/comfyui-jina-clip-v2), in `models/text_encoders/` - "
            "or the Hugging Face files with tokenizer.model / tokenizer.json beside them; Flux `ae.safetensors` in "
            "`models/vae/`.\n\nFloat8DiTLoader loads the DiT as fp8 with per-channel scales (3.5 GB) including "
            "NewBie's Jina pooled path, which ComfyUI 0.3.x drops; NewBieTextEncoderLoader loads Gemma-3-4B-it and "
            "Jina CLIP v2 as fp8 too (about 5.4 GB together, embeddings kept bf16), so text encoders, DiT and VAE "
            "fit 16 GB with room for 1024x1024. With 24 GB set weight_format to default.\n\nFlow matching, shift 6 "
            "(ModelSamplingAuraFlow), 24 steps, euler, CFG 4.5 (model card: CFG 4-5, 18-28 steps).")
    return GraphSpec(nodes=[
        NodeSpec(1, "Float8DiTLoader", {"model_name": NEWBIE_DIT["name"]}, properties={"models": [NEWBIE_DIT]},
                 size=(340, 200)),
        NodeSpec(2, "ModelSamplingAuraFlow", {"shift": 6.0}, links={"model": (1, 0)}),
        NodeSpec(3, "NewBieTextEncoderLoader", {"gemma_name": NEWBIE_GEMMA, "jina_name": NEWBIE_JINA,
                                                "weight_format": "fp8"}, size=(340, 160)),
        NodeSpec(4, "NewBieXMLPrompt", {"character_1_name": "hatsune miku", "character_1_gender": "1girl",
                                        "character_1_appearance": "long twintails, aqua hair, aqua eyes, smile",
                                        "style": "anime", "background": "city street at night, neon lights",
                                        "quality": "masterpiece, best quality"}, size=(360, 520)),
        NodeSpec(5, "NewBieTextEncode", {"system_prompt": "high_quality"}, links={"clip": (3, 0), "text": (4, 0)},
                 title="Positive", size=(400, 160)),
        NodeSpec(6, "NewBieTextEncode", {"text": NEWBIE_NEGATIVE, "system_prompt": "high_quality"},
                 links={"clip": (3, 0)}, title="Negative", size=(400, 160)),
        NodeSpec(7, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        NodeSpec(8, "KSampler", {"seed": 42, "steps": 24, "cfg": 4.5, "sampler_name": "euler", "scheduler": "simple",
                                 "denoise": 1.0},
                 links={"model": (2, 0), "positive": (5, 0), "negative": (6, 0), "latent_image": (7, 0)}),
        NodeSpec(9, "VAELoader", {"vae_name": FLUX_AE["name"]}, properties={"models": [FLUX_AE]}),
        NodeSpec(10, "VAEDecode", links={"samples": (8, 0), "vae": (9, 0)}),
        NodeSpec(11, "SaveImage", {"filename_prefix": "lowvram_newbie"}, links={"images": (10, 0)}),
    ], notes=[("Read me", note, (40, 760))])


WORKFLOWS = {"sdxl_24gb": sdxl_24gb, "flux_dev_24gb": flux_dev_24gb, "newbie_16gb": newbie_16gb}


def main() -> int:
    with tempfile.TemporaryDirectory() as base, ComfyServer(ServerConfig(base_dir=Path(base))) as server:
        info = server.object_info()
    for name, make in WORKFLOWS.items():
        path = REPO_ROOT / "workflows" / f"{name}.json"
        path.write_text(json.dumps(build_ui(make(), info), indent=1) + "\n")
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
