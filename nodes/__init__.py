"""ComfyUI nodes of the pack: thin wrappers that turn widget values into a frozen config and call quant/,
offload/ or the ComfyUI adapters. Category root: `lowvram`."""
