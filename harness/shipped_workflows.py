"""The shipped workflows, described compactly; `python -m harness.shipped_workflows` rewrites workflows/.

Each description becomes a UI-format JSON file through workflow_builder against a live server's
/object_info (started here with the pack loaded), so the files match the real node schemas. Settings come
from bench/ measurements; the note in each file names the model files, their folders and the card tier.
"""
from __future__ import annotations

import dataclasses
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

# VRAMGuard on the MODEL input of every KSampler (issue #6). Widgets not named keep the node's defaults
# (headroom_gb 0.5, oom_retries 2).
GUARD = {"budget_gb": 0.0, "policy": "adapt", "report": True}
GUARD_NOTE = ("VRAMGuard (policy adapt, budget 0 = what the card has free) predicts the peak VRAM before sampling "
              "and adapts the plan (fewer resident weights, smaller batch runs, tiled decode) or stops with a clear "
              "message saying what to change; its report (peak and time per stage) appears on the node after the "
              "run.")


def _guarded(nodes: list) -> list:
    """`nodes` with a VRAMGuard (id: one above the highest) between the KSampler and what fed its model."""
    guard_id = max(n.id for n in nodes) + 1
    out = []
    for n in nodes:
        if n.type == "KSampler":
            out.append(NodeSpec(guard_id, "VRAMGuard", GUARD, links={"model": n.links["model"]}, size=(340, 220)))
            n = dataclasses.replace(n, links={**n.links, "model": (guard_id, 0)})
        out.append(n)
    return out


def _flux_nodes(streamed: bool) -> list:
    """Flux-dev text-to-image: Float8DiTLoader; streamed, also ChunkedOffloadUNet (node 2, the rest shift by
    one), ChunkedOffloadTextEncoder after the CLIP loader and LazyVAEDecode instead of VAEDecode."""
    o = 1 if streamed else 0
    decode = (NodeSpec(9 + o, "LazyVAEDecode", {"tiling": "auto"}, links={"samples": (7 + o, 0), "vae": (8 + o, 0)},
                       size=(340, 160)) if streamed
              else NodeSpec(9, "VAEDecode", links={"samples": (7, 0), "vae": (8, 0)}))
    stream = [NodeSpec(2, "ChunkedOffloadUNet", {"vram_budget_gb": 0.0}, links={"model": (1, 0)}, size=(340, 160))]
    nodes = _guarded([
        NodeSpec(1, "Float8DiTLoader", {"model_name": FLUX_DEV["name"]}, properties={"models": [FLUX_DEV]},
                 size=(340, 200)),
        *(stream if streamed else []),
        NodeSpec(2 + o, "DualCLIPLoader", {"clip_name1": CLIP_L["name"], "clip_name2": T5XXL["name"],
                                           "type": "flux"}, properties={"models": [CLIP_L, T5XXL]}),
        NodeSpec(3 + o, "CLIPTextEncode", {"text": POSITIVE}, links={"clip": (2 + o, 0)}, title="Prompt",
                 size=(400, 160)),
        NodeSpec(4 + o, "FluxGuidance", {"guidance": 3.5}, links={"conditioning": (3 + o, 0)}),
        NodeSpec(5 + o, "ConditioningZeroOut", links={"conditioning": (3 + o, 0)}, title="Negative (unused at CFG 1)"),
        NodeSpec(6 + o, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        NodeSpec(7 + o, "KSampler", {"seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler",
                                     "scheduler": "simple", "denoise": 1.0},
                 links={"model": (1 + o, 0), "positive": (4 + o, 0), "negative": (5 + o, 0),
                        "latent_image": (6 + o, 0)}),
        NodeSpec(8 + o, "VAELoader", {"vae_name": FLUX_AE["name"]}, properties={"models": [FLUX_AE]}),
        decode,
        NodeSpec(10 + o, "SaveImage", {"filename_prefix": "lowvram_flux"}, links={"images": (9 + o, 0)}),
    ])
    return _streamed_text_encoder(nodes, "CLIPTextEncode") if streamed else nodes


def _streamed_text_encoder(nodes: list, encode_type: str) -> list:
    """`nodes` with a ChunkedOffloadTextEncoder (id: one above the highest) between the CLIP loader and the
    `encode_type` nodes it fed: ComfyUI then evicts the encoder without copying it back to the host."""
    te_id = max(n.id for n in nodes) + 1
    (source,) = {n.links["clip"] for n in nodes if n.type == encode_type}
    out = []
    for n in nodes:
        if n.type == encode_type:
            n = dataclasses.replace(n, links={**n.links, "clip": (te_id, 0)})
        out.append(n)
        if n.id == source[0]:
            out.append(NodeSpec(te_id, "ChunkedOffloadTextEncoder", {"vram_budget_gb": 0.0}, links={"clip": source},
                                size=(340, 130)))
    return out


def _sdxl_nodes(decode_type: str) -> list:
    """SDXL all-in-one checkpoint text-to-image; `decode_type` is VAEDecode or LazyVAEDecode."""
    decode = (NodeSpec(6, "LazyVAEDecode", {"tiling": "auto"}, links={"samples": (5, 0), "vae": (1, 2)},
                       size=(340, 160)) if decode_type == "LazyVAEDecode"
              else NodeSpec(6, "VAEDecode", links={"samples": (5, 0), "vae": (1, 2)}))
    return _guarded([
        NodeSpec(1, "CheckpointLoaderSimple", {"ckpt_name": SDXL_CKPT["name"]}, properties={"models": [SDXL_CKPT]}),
        NodeSpec(2, "CLIPTextEncode", {"text": POSITIVE}, links={"clip": (1, 1)}, title="Positive", size=(400, 160)),
        NodeSpec(3, "CLIPTextEncode", {"text": NEGATIVE}, links={"clip": (1, 1)}, title="Negative", size=(400, 160)),
        NodeSpec(4, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        NodeSpec(5, "KSampler", {"seed": 42, "steps": 25, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal",
                                 "denoise": 1.0},
                 links={"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)}),
        decode,
        NodeSpec(7, "SaveImage", {"filename_prefix": "lowvram_sdxl"}, links={"images": (6, 0)}),
    ])


def sdxl_24gb() -> GraphSpec:
    note = ("## SDXL on a 24 GB card\n\nModel: `sd_xl_base_1.0.safetensors` (6.9 GB) in `models/checkpoints/`.\n\n"
            "SDXL's UNet (5.1 GB fp16), both CLIPs and the VAE fit a 24 GB card resident, so this graph uses "
            "ComfyUI's own loader, sampler and decoder; the 12 and 16 GB variants decode with LazyVAEDecode.\n\n"
            f"{GUARD_NOTE}\n\n1024x1024, 25 steps, euler, CFG 6.")
    return GraphSpec(nodes=_sdxl_nodes("VAEDecode"), notes=[("Read me", note, (40, 700))])


def flux_dev_24gb() -> GraphSpec:
    note = ("## Flux.1-dev on a 24 GB card\n\nModels: `flux1-dev.safetensors` (23.8 GB, bf16) in "
            "`models/diffusion_models/`; `clip_l.safetensors` and `t5xxl_fp16.safetensors` in "
            "`models/text_encoders/`; `ae.safetensors` in `models/vae/`.\n\n"
            "Float8DiTLoader quantizes the bf16 file to fp8 with per-channel scales while it loads (11.1 GiB "
            "resident) and computes with fp8 matmul on RTX 40xx / H100 and newer; the whole model stays on a "
            "24 GB card. Tick save_quantized_copy once to write an fp8 copy that loads faster.\n\n"
            f"{GUARD_NOTE}\n\n1024x1024, 20 steps, euler/simple, guidance 3.5.")
    return GraphSpec(nodes=_flux_nodes(streamed=False), notes=[("Read me", note, (40, 760))])


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
            f"fit 16 GB with room for 1024x1024. With 24 GB set weight_format to default.\n\n{GUARD_NOTE}\n\n"
            "Flow matching, shift 6 "
            "(ModelSamplingAuraFlow), 24 steps, euler, CFG 4.5 (model card: CFG 4-5, 18-28 steps).")
    dit = NodeSpec(1, "Float8DiTLoader", {"model_name": NEWBIE_DIT["name"]}, properties={"models": [NEWBIE_DIT]},
                   size=(340, 200))
    extra = (NodeSpec(2, "ModelSamplingAuraFlow", {"shift": 6.0}, links={"model": (1, 0)}),)
    decode = NodeSpec(10, "VAEDecode", links={"samples": (8, 0), "vae": (9, 0)})
    return GraphSpec(nodes=_newbie_nodes(dit, "fp8", (2, 0), decode, extra), notes=[("Read me", note, (40, 760))])


# --- Tiered variants (issue #8). Settings from bench/: Float8DiTLoader (fp8, per-channel, compute auto) ->
# ChunkedOffloadUNet (budget 0 = auto) -> sampler, LazyVAEDecode (tiling auto) below 24 GB; the H200 runs
# capped the budget to simulate smaller cards, so the figures are relative, not a consumer card's timings.
BENCH = "bench/results/offload_flux_nvidia-h200_2026-11-21T0718.json"
MEASURED = (f"Measured on an H200 with the VRAM budget capped to simulate a smaller card ({BENCH}): Flux-dev fp8 "
            "+ ChunkedOffloadUNet took 0.84x / 0.88x / 1.02x / 1.23x the time of resident bf16 at 12 / 8 / 6 / 4 "
            "GiB, peak always under the budget (ComfyUI's own fp8 at those budgets: 1.23 / 1.41 / 1.47 / 1.70x); "
            "LazyVAEDecode's tiled 1024x1024 Flux AE decode peaked at 0.91 GiB (ComfyUI: 11.9 GiB). A consumer "
            "card's PCIe link is slower than an H200's, so streaming costs more there than these ratios show.")
STREAM_NOTE = ("ChunkedOffloadUNet (vram_budget_gb 0 = auto: what is free when sampling starts, less the "
               "activations and a margin) keeps what fits on the GPU and streams the other blocks from pinned "
               "host memory, copies overlapped with compute; LazyVAEDecode keeps the VAE off the GPU until it "
               "runs and decodes in tiles when a full decode would not fit.")


def te_stream_note(encoder: str) -> str:
    return (f"ChunkedOffloadTextEncoder streams {encoder}'s blocks the same way while it encodes, so that when the "
            "diffusion model needs the memory the encoder leaves the GPU without its weights being copied back to "
            "system RAM (ComfyUI's own eviction of a partly loaded T5-XXL took about 5 s on an H200).")


ZIMAGE = "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files"
ZIMAGE_DIT = {"name": "z_image_turbo_bf16.safetensors", "directory": "diffusion_models",
              "url": f"{ZIMAGE}/diffusion_models/z_image_turbo_bf16.safetensors"}
QWEN3_4B = {"name": "qwen_3_4b.safetensors", "directory": "text_encoders",
            "url": f"{ZIMAGE}/text_encoders/qwen_3_4b.safetensors"}
ZIMAGE_AE = {**FLUX_AE, "url": f"{ZIMAGE}/vae/ae.safetensors"}
# Comfy-Org's bf16 repack of DiffSynth-Studio/Z-Image-Turbo-DistillPatch (158,826,336 bytes): keeps Turbo's
# 8-step behaviour when LoRAs trained on Z-Image are applied.
ZIMAGE_LORA = {"name": "z_image_turbo_distill_patch_lora_bf16.safetensors", "directory": "loras",
               "url": f"{ZIMAGE}/loras/z_image_turbo_distill_patch_lora_bf16.safetensors"}
FLUX_FILES = ("Models: `flux1-dev.safetensors` (23.8 GB, bf16) in `models/diffusion_models/`; `clip_l.safetensors` "
              "and `t5xxl_fp16.safetensors` in `models/text_encoders/`; `ae.safetensors` in `models/vae/`.")
# Card tier -> what the note says about it (the nearest measured budget: auto leaves ~2-4 GiB for the rest).
FLUX_TIER_BASIS = {16: "a 16 GB card gives auto about 12 GiB: the 0.84x point",
                   12: "a 12 GB card gives auto about 8 GiB: the 0.88x point",
                   8: "an 8 GB card gives auto about 4-6 GiB: the 1.02x-1.23x points; needs 32 GB of system RAM "
                      "(T5-XXL fp16 and the streamed blocks live there)"}


def flux_dev_streamed(tier: int) -> GraphSpec:
    note = (f"## Flux.1-dev on a {tier} GB card\n\n{FLUX_FILES}\n\nFloat8DiTLoader quantizes the bf16 file to "
            f"fp8 with per-channel scales while it loads (11.1 GiB, more than the card can hold with "
            f"activations). {STREAM_NOTE} {te_stream_note('T5-XXL')}\n\n"
            f"{MEASURED} Here {FLUX_TIER_BASIS[tier]}.\n\n{GUARD_NOTE}\n\n1024x1024, 20 steps, euler/simple, "
            "guidance 3.5.")
    return GraphSpec(nodes=_flux_nodes(streamed=True), notes=[("Read me", note, (40, 760))])


def sdxl_lazy_decode(tier: int) -> GraphSpec:
    note = (f"## SDXL on a {tier} GB card\n\nModel: `sd_xl_base_1.0.safetensors` (6.9 GB) in `models/checkpoints/`."
            f"\n\nThe UNet (5.1 GB fp16) fits a {tier} GB card resident; the peak is the VAE decode at 1024x1024, "
            "so LazyVAEDecode replaces VAEDecode: it keeps the VAE off the GPU until it runs, decodes in tiles "
            "when a full decode would not fit (tiling auto) and frees the VAE afterwards. Measured on an H200 "
            f"({BENCH} and the vae_attention results): a tiled 1024x1024 decode peaked at 0.91 GiB where "
            "ComfyUI's VAEDecode took 11.9 GiB (Flux AE; the SDXL VAE has the same decoder widths)."
            f"\n\n{GUARD_NOTE}\n\n1024x1024, 25 steps, euler, CFG 6.")
    return GraphSpec(nodes=_sdxl_nodes("LazyVAEDecode"), notes=[("Read me", note, (40, 700))])


def _newbie_nodes(dit: NodeSpec, te_format: str, model_out: tuple, decode: NodeSpec, extra=()) -> list:
    return _guarded([dit, *extra,
            NodeSpec(3, "NewBieTextEncoderLoader", {"gemma_name": NEWBIE_GEMMA, "jina_name": NEWBIE_JINA,
                                                    "weight_format": te_format}, size=(340, 160)),
            NodeSpec(4, "NewBieXMLPrompt", {"character_1_name": "hatsune miku", "character_1_gender": "1girl",
                                            "character_1_appearance": "long twintails, aqua hair, aqua eyes, smile",
                                            "style": "anime", "background": "city street at night, neon lights",
                                            "quality": "masterpiece, best quality"}, size=(360, 520)),
            NodeSpec(5, "NewBieTextEncode", {"system_prompt": "high_quality"}, links={"clip": (3, 0), "text": (4, 0)},
                     title="Positive", size=(400, 160)),
            NodeSpec(6, "NewBieTextEncode", {"text": NEWBIE_NEGATIVE, "system_prompt": "high_quality"},
                     links={"clip": (3, 0)}, title="Negative", size=(400, 160)),
            NodeSpec(7, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            NodeSpec(8, "KSampler", {"seed": 42, "steps": 24, "cfg": 4.5, "sampler_name": "euler",
                                     "scheduler": "simple", "denoise": 1.0},
                     links={"model": model_out, "positive": (5, 0), "negative": (6, 0), "latent_image": (7, 0)}),
            NodeSpec(9, "VAELoader", {"vae_name": FLUX_AE["name"]}, properties={"models": [FLUX_AE]}),
            decode,
            NodeSpec(11, "SaveImage", {"filename_prefix": "lowvram_newbie"}, links={"images": (10, 0)})])


NEWBIE_FILES = ("Models: `NewBie-Image-Exp0.1.safetensors` (7.0 GB bf16: NewBie-AI/NewBie-image-Exp0.1's "
                "`transformer/diffusion_pytorch_model.safetensors`, renamed) in `models/diffusion_models/`; "
                "`gemma_3_4b_it_bf16.safetensors` (7.8 GB) and `jina_clip_v2_bf16.safetensors` (1.1 GB), ComfyUI "
                "repacks with their tokenizers inside (woctordho/comfyui-gemma-3-4b-it, "
                "woctordho/comfyui-jina-clip-v2), in `models/text_encoders/`; Flux `ae.safetensors` in `models/vae/`.")
NEWBIE_SAMPLING = "Flow matching, shift 6 (ModelSamplingAuraFlow), 24 steps, euler, CFG 4.5."


def newbie_12gb() -> GraphSpec:
    note = ("## NewBie-image Exp0.1 on a 12 GB card\n\n" + NEWBIE_FILES + "\n\nFloat8DiTLoader loads the DiT as "
            "fp8 with per-channel scales (3.5 GB, Jina pooled path included; compute auto_fast_accum: the fp8 "
            "matmul's fast accumulation, whose error against bf16 was within 0.0002 relative L2 of the default's) "
            "and NewBieTextEncoderLoader loads "
            f"Gemma-3-4B-it and Jina CLIP v2 as fp8 (about 5.4 GB). {STREAM_NOTE} With CFG the DiT runs twice "
            f"per step, so 1024x1024 activations need the headroom.\n\n{MEASURED}\n\n{GUARD_NOTE}\n\n"
            f"{NEWBIE_SAMPLING}")
    # Fast accumulation: its error against bf16 within 0.0002 relative L2 of the default accumulation's, the DiT
    # call 67.8 against 70.0 ms on an H200 (bench/results/newbie_dit_fidelity_nvidia-h200_2026-11-22T1046.json).
    dit = NodeSpec(1, "Float8DiTLoader", {"model_name": NEWBIE_DIT["name"], "compute": "auto_fast_accum"},
                   properties={"models": [NEWBIE_DIT]}, size=(340, 200))
    extra = (NodeSpec(2, "ModelSamplingAuraFlow", {"shift": 6.0}, links={"model": (1, 0)}),
             NodeSpec(12, "ChunkedOffloadUNet", {"vram_budget_gb": 0.0}, links={"model": (2, 0)}, size=(340, 160)))
    decode = NodeSpec(10, "LazyVAEDecode", {"tiling": "auto"}, links={"samples": (8, 0), "vae": (9, 0)},
                      size=(340, 160))
    return GraphSpec(nodes=_newbie_nodes(dit, "fp8", (12, 0), decode, extra), notes=[("Read me", note, (40, 760))])


def newbie_24gb() -> GraphSpec:
    note = ("## NewBie-image Exp0.1 on a 24 GB card\n\n" + NEWBIE_FILES + "\n\nEverything fits a 24 GB card in "
            "bf16: NewBieDiTLoader loads the DiT (7.0 GB) with NewBie's Jina pooled path, which ComfyUI 0.3.x "
            "drops; NewBieTextEncoderLoader loads both text encoders at their file precision (8.9 GB), and "
            f"ComfyUI moves them off the GPU after encoding. The 12 and 16 GB variants use fp8 weights.\n\n"
            f"{GUARD_NOTE}\n\n{NEWBIE_SAMPLING}")
    dit = NodeSpec(1, "NewBieDiTLoader", {"unet_name": NEWBIE_DIT["name"]}, properties={"models": [NEWBIE_DIT]})
    extra = (NodeSpec(2, "ModelSamplingAuraFlow", {"shift": 6.0}, links={"model": (1, 0)}),)
    decode = NodeSpec(10, "VAEDecode", links={"samples": (8, 0), "vae": (9, 0)})
    return GraphSpec(nodes=_newbie_nodes(dit, "default", (2, 0), decode, extra), notes=[("Read me", note, (40, 760))])


ZIMAGE_FILES = ("Models (Comfy-Org/z_image_turbo): `z_image_turbo_bf16.safetensors` (12.3 GB) in "
                "`models/diffusion_models/`; `qwen_3_4b.safetensors` (8.0 GB) in `models/text_encoders/`; "
                "`ae.safetensors` (the Flux AE) in `models/vae/`.")
ZIMAGE_SAMPLING = "Turbo: 8 steps, CFG 1 (no negative prompt), euler/simple, shift 3 (ModelSamplingAuraFlow)."
ZIMAGE_TIER = {
    24: ("Float8DiTLoader quantizes the DiT to fp8 with per-channel scales while it loads (6.2 GB) and computes "
         "with fp8 matmul where the GPU has it; the DiT stays resident, ComfyUI moves Qwen3-4B (8.0 GB) off the "
         "GPU after encoding."),
    16: ("Float8DiTLoader loads the DiT as fp8 (6.2 GB). A LoRA is applied on top (LoraLoaderModelOnly, strength "
         f"1.0): the example is `{ZIMAGE_LORA['name']}` (159 MB, in `models/loras/`), Comfy-Org's bf16 repack of "
         "DiffSynth-Studio/Z-Image-Turbo-DistillPatch, which keeps Turbo's 8-step behaviour when LoRAs trained on "
         "Z-Image are applied. Swap in your own style or character LoRA (ComfyUI or diffusers key layout), or "
         "keep the distill patch and chain a second LoraLoaderModelOnly with yours after it. "
         f"{STREAM_NOTE}"),
    12: f"Float8DiTLoader loads the DiT as fp8 (6.2 GB). {STREAM_NOTE} {te_stream_note('Qwen3-4B')}",
}


def z_image_turbo(tier: int) -> GraphSpec:
    lora = tier == 16
    note = (f"## Z-Image-Turbo on a {tier} GB card{' with a LoRA' if lora else ''}\n\n{ZIMAGE_FILES}\n\n"
            f"{ZIMAGE_TIER[tier]}" + ("" if tier == 24 else f"\n\n{MEASURED}")
            + f"\n\n{GUARD_NOTE}\n\n1024x1024. {ZIMAGE_SAMPLING}")
    nodes = [NodeSpec(1, "Float8DiTLoader", {"model_name": ZIMAGE_DIT["name"]}, properties={"models": [ZIMAGE_DIT]},
                      size=(340, 200))]
    model = (1, 0)
    if lora:
        nodes.append(NodeSpec(12, "LoraLoaderModelOnly", {"lora_name": ZIMAGE_LORA["name"], "strength_model": 1.0},
                              links={"model": model}, properties={"models": [ZIMAGE_LORA]},
                              title="LoRA (distill patch; swap in yours)"))
        model = (12, 0)
    nodes.append(NodeSpec(2, "ModelSamplingAuraFlow", {"shift": 3.0}, links={"model": model}))
    model = (2, 0)
    if tier < 24:
        nodes.append(NodeSpec(13, "ChunkedOffloadUNet", {"vram_budget_gb": 0.0}, links={"model": model},
                              size=(340, 160)))
        model = (13, 0)
    decode = ("VAEDecode", {}) if tier == 24 else ("LazyVAEDecode", {"tiling": "auto"})
    nodes += [
        NodeSpec(3, "CLIPLoader", {"clip_name": QWEN3_4B["name"], "type": "lumina2"},
                 properties={"models": [QWEN3_4B]}),
        NodeSpec(4, "CLIPTextEncode", {"text": POSITIVE}, links={"clip": (3, 0)}, title="Prompt", size=(400, 160)),
        NodeSpec(5, "ConditioningZeroOut", links={"conditioning": (4, 0)}, title="Negative (unused at CFG 1)"),
        NodeSpec(6, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        NodeSpec(7, "KSampler", {"seed": 42, "steps": 8, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                                 "denoise": 1.0},
                 links={"model": model, "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)}),
        NodeSpec(8, "VAELoader", {"vae_name": ZIMAGE_AE["name"]}, properties={"models": [ZIMAGE_AE]}),
        NodeSpec(9, decode[0], decode[1], links={"samples": (7, 0), "vae": (8, 0)}, size=(340, 160)),
        NodeSpec(10, "SaveImage", {"filename_prefix": "lowvram_zimage"}, links={"images": (9, 0)}),
    ]
    nodes = _guarded(nodes)
    if tier == 12:   # at 16 GB Qwen3-4B and the fp8 DiT fit side by side: no eviction to spare (T0349: 6.71 s, 6.44 without)
        nodes = _streamed_text_encoder(nodes, "CLIPTextEncode")
    return GraphSpec(nodes=nodes, notes=[("Read me", note, (40, 760))])


# File stem -> builder. Names are forever once shipped (users' links and the README point at them).
WORKFLOWS = {
    "sdxl_24gb": sdxl_24gb, "sdxl_16gb": lambda: sdxl_lazy_decode(16), "sdxl_12gb": lambda: sdxl_lazy_decode(12),
    "flux_dev_24gb": flux_dev_24gb, "flux_dev_16gb": lambda: flux_dev_streamed(16),
    "flux_dev_12gb": lambda: flux_dev_streamed(12), "flux_dev_8gb": lambda: flux_dev_streamed(8),
    "newbie_24gb": newbie_24gb, "newbie_16gb": newbie_16gb, "newbie_12gb": newbie_12gb,
    "z_image_turbo_24gb": lambda: z_image_turbo(24), "z_image_turbo_16gb": lambda: z_image_turbo(16),
    "z_image_turbo_12gb": lambda: z_image_turbo(12),
}


E2E_RESULTS = "bench/results/workflows_e2e_nvidia-h200_*.json"


def measured_rows() -> dict:
    """bench.workflows_e2e's prompt rows from the committed results, later files winning."""
    from bench.e2e_table import merged_rows

    return merged_rows(sorted(str(p) for p in REPO_ROOT.glob(E2E_RESULTS)))


def measured_line(name: str, rows: dict) -> str:
    """One sentence of what bench.workflows_e2e measured for this workflow at its tier ("" if nothing)."""
    from bench.e2e_table import truncated

    tier = float(name.rsplit("_", 1)[1][:-2])
    ours = [rows.get((name, "ours", "tier", p, tier)) for p in ("first", "repeat")]
    core = [rows.get((name, "core", "core", p, tier)) for p in ("first", "repeat")]
    if not all(r and "error" not in r for r in ours + core):
        return ""
    t = truncated
    files = ours[0]["file"] if core[0]["file"] == ours[0]["file"] else f"{ours[0]['file']}; core: {core[0]['file']}"
    return (f"End to end on an H200 left {tier:g} GiB (`python -m bench.workflows_e2e`, {files}): first "
            f"prompt {t(ours[0]['prompt_s'], 1)} s, next seed {t(ours[1]['prompt_s'], 1)} s, "
            f"{t(step_seconds(ours[0]), 3)} s/it, peak {t(ours[0]['peak_gib'], 1)} GiB; the same graph with ComfyUI's core "
            f"nodes: {t(core[0]['prompt_s'], 1)} s, {t(core[1]['prompt_s'], 1)} s, {t(step_seconds(core[0]), 3)} s/it, "
            f"peak {t(core[0]['peak_gib'], 1)} GiB.")


def step_seconds(row: dict) -> float:
    """A prompt row's seconds per step: the median of its steps where the row has them. The mean over the
    progress reports' span counts when the host issued a step: with steps replayed from CUDA graphs and a
    sampler that never waits for the GPU, the host runs ahead (a 0.0019 s "step" in Z-Image's T1715 row)."""
    median = row.get("s_per_it_median")
    return median if median is not None else row["s_per_it"]


def with_measurements(name: str, spec: GraphSpec, rows: dict) -> GraphSpec:
    line = measured_line(name, rows)
    if not line:
        return spec
    (title, text, pos), *rest = spec.notes
    return dataclasses.replace(spec, notes=[(title, f"{text}\n\n{line}", pos), *rest])


def main() -> int:
    rows = measured_rows()
    with tempfile.TemporaryDirectory() as base, ComfyServer(ServerConfig(base_dir=Path(base))) as server:
        info = server.object_info()
    for name, make in WORKFLOWS.items():
        path = REPO_ROOT / "workflows" / f"{name}.json"
        path.write_text(json.dumps(build_ui(with_measurements(name, make(), rows), info), indent=1) + "\n")
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
