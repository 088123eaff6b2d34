"""Compile each streamed block's `forward` only, so that the streamer's hooks stay eager around it.

Why not ComfyUI's helper here: it swaps whole modules for `torch.compile(module)` wrappers, whose compiled
frame starts at the module's `__call__` and so would trace the streamer's forward hooks (stream waits, copies,
re-pointing `.data` at transfer slots). Compiling `type(block).forward` keeps `__call__` (hooks included)
eager: the pre-hook points the parameters at the slot, then the compiled graph reads them as graph inputs
(torch.compile treats module parameters as inputs, so their storage may change from call to call without a
recompile). Blocks of one class share one compiled function, hence one graph for all Flux double blocks.

CompileRequest travels on the ModelPatcher as an attachment (COMPILE_ATTACHMENT), so clones (LoRA loaders
after the node) carry it and the streaming session finds it when it attaches.
"""
from __future__ import annotations

from dataclasses import dataclass
import types

import torch

COMPILE_ATTACHMENT = "lowvram_compile_blocks"


@dataclass(frozen=True)
class CompileRequest:
    backend: str = "inductor"
    mode: str | None = None   # None = torch.compile's default

    def describe(self) -> str:
        return f"{self.backend}, mode {self.mode or 'default'}"


# (block class, request) -> torch.compile(BlockClass.forward): made once per process, so that a re-attach
# (a re-plan, the next prompt) reuses the compiled graphs instead of compiling again.
_COMPILED: dict[tuple[type, CompileRequest], object] = {}


def compiled_forward(cls: type, request: CompileRequest):
    key = (cls, request)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(cls.forward, backend=request.backend, mode=request.mode)
    return _COMPILED[key]


def install(blocks, request: CompileRequest) -> int:
    """Give every block an instance `forward` that runs its class's compiled forward; returns how many."""
    for block in blocks:
        block.forward = types.MethodType(compiled_forward(type(block), request), block)
    return len(blocks)


def remove(blocks) -> None:
    """Undo install(): the class's own forward again (safe on blocks never installed)."""
    for block in blocks:
        block.__dict__.pop("forward", None)


def installed(block) -> bool:
    return "forward" in block.__dict__
