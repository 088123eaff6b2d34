"""NewBieTextEncode: a prompt -> NewBie conditioning (Gemma-3 hidden states + mask, Jina pooled vector)."""
from __future__ import annotations

import logging
import time

log = logging.getLogger("lowvram")
GiB = 1 << 30

# NewBie's demo.py system prompts; the text is prepended to the caption for Gemma only (Jina sees the
# caption alone) and an empty caption gets none, as there.
SYSTEM_PROMPTS = {
    "high_quality": "You are an assistant designed to generate high-quality images based on user prompts.",
    "alignment": "You are an assistant designed to generate high-quality images with the highest degree of "
                 "image-text alignment based on textual prompts.",
    "superior": "You are an assistant designed to generate superior images with the superior degree of "
                "image-text alignment based on textual prompts or user prompts.",
    "none": "",
}


def gemma_text(text: str, system_prompt: str) -> str:
    """What Gemma reads: the system prompt directly followed by the caption (demo.py), or the caption alone."""
    system = SYSTEM_PROMPTS[system_prompt]
    return system + text if system and text.strip() else text


class NewBieTextEncode:
    DESCRIPTION = ("Encodes a NewBie prompt (XML or tags) as the model was trained: Gemma-3-4B-it's second-to-last "
                   "hidden states of system prompt + caption, and Jina CLIP v2's mean-pooled caption vector.")
    CATEGORY = "lowvram/newbie"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Caption features, their mask and the Jina pooled vector (as pooled_output).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "From NewBieTextEncoderLoader (or ComfyUI's own NewBie CLIP)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The prompt: NewBie XML "
                     "(see NewBieXMLPrompt), danbooru tags or plain text."}),
            "system_prompt": (list(SYSTEM_PROMPTS), {"default": "high_quality", "tooltip": "Text put before the "
                              "prompt for Gemma only, as in NewBie's demo (high_quality is its default)."}),
        }}

    def encode(self, clip, text, system_prompt):
        if system_prompt not in SYSTEM_PROMPTS:
            raise ValueError(f"system_prompt={system_prompt!r} is not one of {', '.join(SYSTEM_PROMPTS)}")
        tokens = clip.tokenize(gemma_text(text, system_prompt))
        if set(tokens) != {"gemma", "jina"}:
            raise ValueError(f"this CLIP holds {', '.join(tokens)}, not NewBie's Gemma-3 + Jina CLIP v2 pair; load "
                             "the text encoders with NewBieTextEncoderLoader")
        tokens["jina"] = clip.tokenize(text)["jina"]
        t0 = time.perf_counter()
        out = clip.encode_from_tokens_scheduled(tokens)
        log_placement(clip, time.perf_counter() - t0)
        return (out,)


def log_placement(clip, seconds: float) -> None:
    """Where the encoders ran and how much of them ComfyUI kept on that device (a partial load casts the
    rest from host memory on every call): the first thing to read when text encoding is slow."""
    patcher = getattr(clip, "patcher", None)
    if patcher is None or not hasattr(patcher, "model_size"):
        return
    total = patcher.model_size()
    loaded = patcher.loaded_size() if hasattr(patcher, "loaded_size") else total
    log.info("LowVRAM Kit NewBieTextEncode: %.2f s on %s; %.2f of %.2f GiB of the encoders loaded there%s",
             seconds, patcher.load_device, loaded / GiB, total / GiB,
             "" if loaded >= total else " (ComfyUI loaded them in part: the rest is cast from host memory per call)")
