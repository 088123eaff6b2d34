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

With ChunkedOffloadUNet (in either order) the streamer compiles instead: it hides the block lists from
ComfyUI and streams through hooks on each block's `__call__`, which a swapped-in compiled module would trace.
So on a streamed model this node only attaches a CompileRequest, and the streaming session compiles each
block's `forward` while it is attached (nodes._compiled_forwards), the hooks staying eager around it.
"""
from __future__ import annotations

import logging

from ._compiled_forwards import COMPILE_ATTACHMENT, CompileRequest
from .comfy_block_streaming import COMPILE_KEY
from .comfy_block_streaming import KEY as STREAMING_KEY
from .comfy_block_streaming import has_apply_model_wrapper
from .model_families import family_of_model

log = logging.getLogger("lowvram")
MODES = ("default", "max-autotune-no-cudagraphs")


def block_keys(patcher) -> list[str]:
    """ComfyUI attribute paths of every unit the family's table names, in call order."""
    dm = patcher.get_model_object("diffusion_model")
    family = family_of_model(dm)
    return [f"diffusion_model.{name}.{index}" for name in family.block_lists
            for index, _ in family.named_stream_units(getattr(dm, name))]


def compile_blocks(model, mode: str = "default", backend: str = "inductor"):
    """A clone of `model` whose blocks run compiled; raises UnknownFamilyError for a model we cannot split."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not allowed; choose one of: {', '.join(MODES)}")
    request = CompileRequest(backend=backend, mode=None if mode == "default" else mode)
    if has_apply_model_wrapper(model, STREAMING_KEY):
        clone = model.clone()
        clone.attachments[COMPILE_ATTACHMENT] = request
        log.info("LowVRAM Kit CompileModelBlocks: the blocks are streamed by ChunkedOffloadUNet, which will compile "
                 "each block's forward (%s) when it attaches, its transfers staying outside the graphs",
                 request.describe())
        return clone
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
    set_torch_compile_wrapper(model=clone, backend=backend, mode=request.mode, keys=keys)
    # A ChunkedOffloadUNet put after this node replaces the wrapper with its own per-forward compile.
    clone.attachments[COMPILE_ATTACHMENT] = request
    log.info("LowVRAM Kit CompileModelBlocks: %d blocks will be compiled (%s) at the first step; the first run of "
             "each block kind and latent size compiles (tens of seconds), later runs reuse it",
             len(keys), request.describe())
    return clone
