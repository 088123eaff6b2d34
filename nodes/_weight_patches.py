"""ComfyUI adapter: the values of a patched weight (LoRA and ComfyUI's other weight patches) for streamed blocks.

ComfyUI patches weights by two routes that round differently:
- a model loaded whole: ModelPatcher.patch_weight_to_device, once per load: the stored weight in fp32 on
  the load device, the layer's convert_weight, comfy.lora.calculate_weight in fp32, then stochastic
  rounding to the stored dtype (seeded by the key) or the layer's set_weight;
- a model loaded in part: a LowVramPatch per patched layer, on every call, in the compute dtype (bf16
  math for a bf16 weight).
ChunkedOffloadUNet must not change an output bit against the model without it, which ComfyUI loads whole
where it fits; so blocks that stay on the device get the first route's values once, when the streamer
copies them there (offload's `resident_values`), and streamed blocks run the same math per call as their
weight function. Nothing here changes a stored tensor: the host copy stays the unpatched weight.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

import comfy.float
import comfy.lora
import comfy.model_patcher

# The key's rounding seed: model_patcher.string_to_seed up to 0.3.7x; newer ComfyUI defines it in comfy.float.
string_to_seed = getattr(comfy.model_patcher, "string_to_seed", None) or comfy.float.string_to_seed


class FullLoadPatch:
    """weight -> patched weight (same dtype, shape, device), as patch_weight_to_device computes it.

    `stored_dtype`: the dtype the layer stores the weight in, which the full load rounds the patched weight
    to. Per call, ComfyUI's cast_bias_weight hands a weight function the weight already cast to the compute
    dtype (a T5 fp16 weight as fp32 on the CPU): it is rounded to the stored dtype all the same, then
    returned in the dtype it came in, as the full load's patched weight would be cast."""

    def __init__(self, key: str, patches: dict, convert=None, setter=None, stored_dtype: torch.dtype | None = None):
        self.key, self.patches, self.convert, self.setter = key, patches, convert, setter
        self.seed = string_to_seed(key)
        self.stored_dtype = stored_dtype

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        temp = weight.to(torch.float32, copy=True)  # (out, in) or any shape: fp32 math like the full load
        if self.convert is not None:
            temp = self.convert(temp, inplace=True)
        out = comfy.lora.calculate_weight(self.patches[self.key], temp, self.key)
        if self.setter is None:
            rounded = comfy.float.stochastic_rounding(out, self.stored_dtype or weight.dtype, seed=self.seed)
            return rounded.to(weight.dtype)
        # The layer's own quantizer (fp8 with its scale), asked for the tensor instead of an update.
        return self.setter(out, seed=self.seed, return_weight=True).to(weight.dtype)


def patch_for(module: torch.nn.Module, attr: str, key: str, patches: dict) -> FullLoadPatch | None:
    """The patch of `module.<attr>` (state-dict key `key`), or None when the patcher has none for it."""
    if key not in patches:
        return None
    # As ComfyUI's get_key_weight finds them: the layer's convert_<attr> and set_<attr>, where it has them.
    return FullLoadPatch(key, patches, getattr(module, f"convert_{attr}", None), getattr(module, f"set_{attr}", None),
                         stored_dtype=getattr(module, attr).dtype)


class ResidentPatches:
    """offload's `resident_values`: the patched values of a tensor, computed on the device it goes to."""

    def __init__(self):
        self.by_tensor: dict[int, FullLoadPatch] = {}

    def add(self, tensor: torch.Tensor, patch: FullLoadPatch) -> None:
        self.by_tensor[id(tensor)] = patch

    def __bool__(self) -> bool:
        return bool(self.by_tensor)

    def __call__(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        patch = self.by_tensor.get(id(tensor))
        if patch is None:
            return None
        # The full load computes on the load device too (cast_to_device, then fp32 math there).
        return patch(tensor.detach().to(device))


@dataclass(frozen=True)
class BlockPatch:
    """One patched tensor of a streamed unit: `module.<attr>` of block `block`."""

    block: int
    module: torch.nn.Module
    attr: str  # "weight" or "bias"
    tensor: torch.Tensor
    patch: FullLoadPatch


def find_block_patches(named_blocks: Iterable[tuple[str, torch.nn.Module]], patches: dict) -> list[BlockPatch]:
    """Every patched weight and bias of the blocks ((state-dict prefix, block), in stream order)."""
    found = []
    for i, (prefix, block) in enumerate(named_blocks):
        for name, m in block.named_modules():
            if not hasattr(m, "weight_function"):
                continue  # not a ComfyUI cast layer: ComfyUI would not patch it per call either
            base = f"{prefix}{'.' + name if name else ''}"
            for attr in ("weight", "bias"):
                tensor = getattr(m, attr, None)
                patch = patch_for(m, attr, f"{base}.{attr}", patches) if tensor is not None else None
                if patch is not None:
                    found.append(BlockPatch(i, m, attr, tensor, patch))
    return found


def resident_patches(found: list[BlockPatch]) -> ResidentPatches:
    """The streamer's `resident_values` for these patches (merged once into resident device copies)."""
    resident = ResidentPatches()
    for p in found:
        resident.add(p.tensor, p.patch)
    return resident


def clear_weight_functions(modules: Iterable[torch.nn.Module]) -> None:
    for m in modules:
        if hasattr(m, "weight_function"):
            m.weight_function, m.bias_function = [], []


def set_streamed_patches(found: list[BlockPatch], is_resident: Callable[[int], bool],
                         modules: Iterable[torch.nn.Module]) -> None:
    """Per-call patches (weight functions, as ComfyUI gives its own offloaded layers) for the blocks that
    stream; resident ones got theirs merged in at attach."""
    clear_weight_functions(modules)
    for p in found:
        if not is_resident(p.block):
            (p.module.weight_function if p.attr == "weight" else p.module.bias_function).append(p.patch)
