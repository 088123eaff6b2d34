"""ComfyUI adapter: torch.compile each block of a diffusion model, not the whole model.

Why blocks only: compiling the whole Flux-dev model the way ComfyUI's TorchCompileModel node does changed one
forward by 0.59 (relative L2) against eager on an H200, while each double or single block compiled alone was
bit-identical to eager on the same inputs (bench/results/compile_fidelity_nvidia-h200_2026-11-21T1449.json).
The difference lives in the small code outside the blocks (timestep, guidance and position embeddings); the
time lives in the blocks, where inductor fuses the norms, modulation, RoPE and our fp8 activation
quantization (quant.matmul hands it plain PyTorch ops inside a graph).

How: ComfyUI's own helper (comfy_api.torch_helpers.set_torch_compile_wrapper) with one key per block, e.g.
"diffusion_model.double_blocks.0": it compiles those modules and swaps them in for each model call through
an APPLY_MODEL wrapper (key "torch.compile"), so unloading, LoRA and other wrappers work as with its node.
Blocks of one kind share one compiled graph (their parameters are graph inputs), so Flux compiles two graphs.

Not with ChunkedOffloadUNet: it hides the block lists from ComfyUI and streams through hooks on the blocks;
the two refuse each other with a message.
"""
from __future__ import annotations

import logging

from .comfy_block_streaming import COMPILE_KEY
from .comfy_block_streaming import KEY as STREAMING_KEY
from .comfy_block_streaming import has_apply_model_wrapper
from .model_families import family_of_model

log = logging.getLogger("lowvram")
MODES = ("default", "max-autotune-no-cudagraphs")


class CompileConflict(ValueError):
    """Block compilation and block streaming asked for on the same model."""


def block_keys(patcher) -> list[str]:
    """ComfyUI attribute paths of every unit the family's table names, in call order."""
    dm = patcher.get_model_object("diffusion_model")
    family = family_of_model(dm)
    return [f"diffusion_model.{name}.{index}" for name in family.block_lists
            for index, _ in family.named_stream_units(getattr(dm, name))]


def compile_blocks(model, mode: str = "default", backend: str = "inductor"):
    """A clone of `model` whose blocks run compiled; raises CompileConflict or UnknownFamilyError."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not allowed; choose one of: {', '.join(MODES)}")
    if has_apply_model_wrapper(model, STREAMING_KEY):
        raise CompileConflict(
            "CompileModelBlocks: this model's blocks are streamed by ChunkedOffloadUNet, which runs them through "
            "hooks that a compiled block would bypass. Use one of the two: ChunkedOffloadUNet when the model does "
            "not fit in VRAM, CompileModelBlocks when it does.")
    try:
        from comfy_api.torch_helpers import set_torch_compile_wrapper
    except ImportError as e:
        raise RuntimeError("CompileModelBlocks needs comfy_api.torch_helpers (ComfyUI with the TorchCompileModel "
                           f"node); this ComfyUI has none ({e}). Update ComfyUI or remove the node.") from e
    if has_apply_model_wrapper(model, COMPILE_KEY):
        log.info("LowVRAM Kit CompileModelBlocks: the model was already compiled (TorchCompileModel or this node); "
                 "that compile is replaced by block-wise compilation")
    clone = model.clone()
    keys = block_keys(clone)
    set_torch_compile_wrapper(model=clone, backend=backend, mode=None if mode == "default" else mode, keys=keys)
    log.info("LowVRAM Kit CompileModelBlocks: %d blocks will be compiled (%s, mode %s) at the first step; the "
             "first run of each block kind and latent size compiles (tens of seconds), later runs reuse it",
             len(keys), backend, mode)
    return clone
