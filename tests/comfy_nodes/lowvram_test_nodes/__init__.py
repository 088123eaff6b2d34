"""Test-only ComfyUI nodes (never shipped; linked into a test server's custom_nodes by the harness).

TinyTextEncoderLoader loads text-encoder files through ComfyUI's real comfy.sd.load_clip, passing the
`model_options` that a tiny synthetic file records in its header (its shrunken config: layers, width).
ComfyUI's own CLIPLoader/DualCLIPLoader build text encoders from fixed full-size configs, so on the CPU
the harness swaps them for this node when it runs shipped workflows on tiny synthetic models.
"""
import json

import comfy.sd
import folder_paths
from safetensors import safe_open

META_KEY = "lowvram.synthetic"


def _model_options(path):
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[META_KEY]).get("model_options", {}) if META_KEY in meta else {}


class TinyTextEncoderLoader:
    CATEGORY = "lowvram_test"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        files = folder_paths.get_filename_list("text_encoders")
        types = [t.name.lower() for t in comfy.sd.CLIPType]
        return {"required": {"clip_name1": (files,), "type": (types,)},
                "optional": {"clip_name2": (["none"] + files,)}}

    def load(self, clip_name1, type, clip_name2="none"):
        names = [clip_name1] + ([clip_name2] if clip_name2 and clip_name2 != "none" else [])
        paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in names]
        options = {}
        for p in paths:
            options.update(_model_options(p))
        clip = comfy.sd.load_clip(ckpt_paths=paths, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                  clip_type=getattr(comfy.sd.CLIPType, type.upper()), model_options=options)
        return (clip,)


NODE_CLASS_MAPPINGS = {"TinyTextEncoderLoader": TinyTextEncoderLoader}
