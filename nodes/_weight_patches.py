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

import torch

import comfy.float
import comfy.lora
import comfy.model_patcher

# The key's rounding seed: model_patcher.string_to_seed up to 0.3.7x; newer ComfyUI defines it in comfy.float.
string_to_seed = getattr(comfy.model_patcher, "string_to_seed", None) or comfy.float.string_to_seed


class FullLoadPatch:
    """weight -> patched weight (same dtype, shape, device), as patch_weight_to_device computes it."""

    def __init__(self, key: str, patches: dict, convert=None, setter=None):
        self.key, self.patches, self.convert, self.setter = key, patches, convert, setter
        self.seed = string_to_seed(key)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        temp = weight.to(torch.float32, copy=True)  # (out, in) or any shape: fp32 math like the full load
        if self.convert is not None:
            temp = self.convert(temp, inplace=True)
        out = comfy.lora.calculate_weight(self.patches[self.key], temp, self.key)
        if self.setter is None:
            return comfy.float.stochastic_rounding(out, weight.dtype, seed=self.seed)
        # The layer's own quantizer (fp8 with its scale), asked for the tensor instead of an update.
        return self.setter(out, seed=self.seed, return_weight=True).to(weight.dtype)


def patch_for(module: torch.nn.Module, attr: str, key: str, patches: dict) -> FullLoadPatch | None:
    """The patch of `module.<attr>` (state-dict key `key`), or None when the patcher has none for it."""
    if key not in patches:
        return None
    # As ComfyUI's get_key_weight finds them: the layer's convert_<attr> and set_<attr>, where it has them.
    return FullLoadPatch(key, patches, getattr(module, f"convert_{attr}", None), getattr(module, f"set_{attr}", None))


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
