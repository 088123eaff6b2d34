"""LowVRAM Kit: run big diffusion transformers on small GPUs inside ComfyUI.

ComfyUI imports this file from custom_nodes/<folder>/. The mappings below are literal so that
ComfyUI-Manager's scanner can read the node ids without importing the pack. A node is listed here only
once it does its whole job; each lives in nodes/ and imports its heavy or optional dependencies lazily,
so one missing optional package never stops the pack from loading.
"""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
