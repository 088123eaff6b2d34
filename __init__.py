"""LowVRAM Kit: run big diffusion transformers on small GPUs inside ComfyUI.

ComfyUI imports this file from custom_nodes/<folder>/. The mappings below are literal dicts so that
ComfyUI-Manager's scanner can read the node ids without importing the pack. A node is listed here only
once it does its whole job. Each is imported through `_node`, so a node whose module fails to import
(a broken optional dependency) is logged and replaced by a stand-in that explains the error when run:
the rest of the pack still loads.
"""
import importlib
import importlib.util
import logging

_log = logging.getLogger("lowvram")


def _node(module: str, name: str):
    if importlib.util.find_spec("comfy") is None:
        return None  # imported outside ComfyUI (e.g. by a test runner walking packages): nothing to register
    try:
        return getattr(importlib.import_module(f".nodes.{module}", __name__), name)
    except Exception as e:  # noqa: BLE001  (any import-time failure must not take the pack down)
        _log.exception("LowVRAM Kit: node %s could not be imported", name)
        message = f"LowVRAM Kit could not import {name}: {type(e).__name__}: {e}. See the server log."

        class Unavailable:
            CATEGORY = "lowvram/unavailable"
            DESCRIPTION = message
            RETURN_TYPES = ()
            FUNCTION = "fail"

            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {}}

            def fail(self):
                raise RuntimeError(message)
        return Unavailable


NODE_CLASS_MAPPINGS = {
    "Float8DiTLoader": _node("float8_dit_loader", "Float8DiTLoader"),
    "LazyVAEDecode": _node("lazy_vae_decode", "LazyVAEDecode"),
    "FlashAttnToggle": _node("flash_attn_toggle", "FlashAttnToggle"),
    "ChunkedOffloadUNet": _node("chunked_offload_unet", "ChunkedOffloadUNet"),
    "NewBieTextEncoderLoader": _node("newbie_text_encoder_loader", "NewBieTextEncoderLoader"),
    "NewBieTextEncode": _node("newbie_text_encode", "NewBieTextEncode"),
    "NewBieXMLPrompt": _node("newbie_xml_prompt", "NewBieXMLPrompt"),
    "NewBieDiTLoader": _node("newbie_dit_loader", "NewBieDiTLoader"),
    "VRAMGuard": _node("vram_guard", "VRAMGuard"),
    "CompileModelBlocks": _node("compile_model_blocks", "CompileModelBlocks"),
    "ChunkedOffloadTextEncoder": _node("chunked_offload_text_encoder", "ChunkedOffloadTextEncoder"),
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "Float8DiTLoader": "Float8 DiT Loader (LowVRAM)",
    "LazyVAEDecode": "Lazy VAE Decode (LowVRAM)",
    "FlashAttnToggle": "Flash Attention Toggle (LowVRAM)",
    "ChunkedOffloadUNet": "Chunked Offload UNet (LowVRAM)",
    "NewBieTextEncoderLoader": "NewBie Text Encoder Loader (LowVRAM)",
    "NewBieTextEncode": "NewBie Text Encode (LowVRAM)",
    "NewBieXMLPrompt": "NewBie XML Prompt (LowVRAM)",
    "NewBieDiTLoader": "NewBie DiT Loader (LowVRAM)",
    "VRAMGuard": "VRAM Guard (LowVRAM)",
    "CompileModelBlocks": "Compile Model Blocks (LowVRAM)",
    "ChunkedOffloadTextEncoder": "Chunked Offload Text Encoder (LowVRAM)",
}



def _register_routes() -> None:
    """GET /lowvram/memory (nodes/memory_route.py) on ComfyUI's server; never fatal to the pack."""
    if importlib.util.find_spec("comfy") is None:
        return
    try:
        importlib.import_module(".nodes.memory_route", __name__).register()
    except Exception:  # noqa: BLE001  (a diagnostic route must not take the nodes down)
        _log.exception("LowVRAM Kit: the /lowvram/memory route could not be registered")


def _prefetch_triton_key() -> None:
    """Triton's one-time installation hash and the fp8 kernels, made while the server starts
    (quant/triton_prefetch.py, quant/kernel_warmup.py)."""
    if importlib.util.find_spec("comfy") is None:
        return
    try:
        import torch

        warmup = importlib.import_module(".quant.kernel_warmup", __name__)
        importlib.import_module(".quant.triton_prefetch", __name__).prefetch_triton_key(
            torch.cuda.is_available(), then=warmup.warm_fp8_kernels)
    except Exception:  # noqa: BLE001  (an optimisation must not take the nodes down)
        _log.exception("LowVRAM Kit: could not start computing Triton's cache key")


_register_routes()
_prefetch_triton_key()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
