"""ComfyUI adapter: NF4 (4-bit NormalFloat, bitsandbytes) Linear layers for NewBie's text encoders.

Passed as `model_options["custom_operations"]`, like the fp8 operations: every Linear whose state dict
brings a 2-D float weight quantizes it on load (blocks of 64 values, one fp32 absmax per block, no nested
statistics), so Gemma-3-4B's projections take 0.53 bytes per weight instead of 2. Embeddings and norms
stay as stored. The forward dequantizes the layer's weight to the input's dtype and runs one matmul.

bitsandbytes is imported only when NF4 is asked for; it is not a dependency of the pack. Its CPU kernels
(bitsandbytes >= 0.46) make NF4 work with device "cpu" too. LoRA patches are not applied to NF4 layers.

Buffers: `nf4_absmax` [numel / 64] fp32 and `nf4_code` [16] travel with the module (device moves, memory
accounting); the packed weight [numel / 2, 1] uint8 stays the layer's `weight` parameter.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

import comfy.ops

log = logging.getLogger("lowvram")
BLOCKSIZE = 64
INSTALL_HINT = ("weight_format 'nf4' needs the bitsandbytes package (0.46 or newer, which also runs on the "
                "CPU): install it into ComfyUI's Python with `python -m pip install bitsandbytes`, or choose "
                "weight_format 'fp8'")


class NF4UnavailableError(RuntimeError):
    pass


def import_bnb_functional():
    """bitsandbytes.functional, or NF4UnavailableError with the install hint."""
    try:
        import bitsandbytes.functional as bnbf
    except (ImportError, OSError) as e:  # OSError: its native library failed to load
        raise NF4UnavailableError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from None
    return bnbf


def make_nf4_ops(quantize_device: torch.device | str = "cpu"):
    """An operations class whose Linear stores NF4; `quantize_device` runs the quantization (a GPU is faster)."""
    bnbf = import_bnb_functional()

    def quantize(w: torch.Tensor, layer: str):
        try:
            return bnbf.quantize_4bit(w.to(quantize_device), blocksize=BLOCKSIZE, quant_type="nf4",
                                      compress_statistics=False)
        except (RuntimeError, NotImplementedError) as e:
            raise NF4UnavailableError(f"bitsandbytes could not quantize {layer} to NF4 on {quantize_device} ({e}); "
                                      "update bitsandbytes (0.46+ has CPU kernels) or choose weight_format 'fp8'") from e

    class LowVRAMNF4Ops(comfy.ops.manual_cast):
        class Linear(comfy.ops.manual_cast.Linear):
            nf4_shape = None

            def reset_parameters(self):
                return None

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                key = prefix + "weight"
                w = state_dict.get(key)
                if w is not None and w.ndim == 2 and w.dtype.is_floating_point and w.element_size() > 1:
                    state_dict.pop(key)
                    packed, qs = quantize(w, prefix.rstrip("."))
                    home = w.device
                    self.weight = torch.nn.Parameter(packed.to(home), requires_grad=False)
                    self.register_buffer("nf4_absmax", qs.absmax.to(home, torch.float32))
                    self.register_buffer("nf4_code", qs.code.to(home))
                    self.nf4_shape, self.nf4_dtype = tuple(w.shape), w.dtype
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)
                if self.nf4_shape is not None:  # made here, not read from the file
                    for k in (key, prefix + "nf4_absmax", prefix + "nf4_code"):
                        if k in missing_keys:
                            missing_keys.remove(k)

            def dequantized_weight(self, device, dtype) -> torch.Tensor:
                state = bnbf.QuantState(absmax=self.nf4_absmax.to(device), shape=torch.Size(self.nf4_shape),
                                        code=self.nf4_code.to(device), blocksize=BLOCKSIZE, quant_type="nf4",
                                        dtype=self.nf4_dtype)
                return bnbf.dequantize_4bit(self.weight.to(device), state).to(dtype)

            def forward_comfy_cast_weights(self, input):
                if self.nf4_shape is None:
                    return super().forward_comfy_cast_weights(input)
                if self.weight_function or self.bias_function:
                    log.warning("LowVRAM Kit: LoRA patches are not applied to NF4 text-encoder layers")
                weight = self.dequantized_weight(input.device, input.dtype)
                bias = None if self.bias is None else self.bias.to(device=input.device, dtype=input.dtype)
                return F.linear(input, weight, bias)

            def forward(self, *args, **kwargs):
                if self.nf4_shape is None:
                    return super().forward(*args, **kwargs)
                return self.forward_comfy_cast_weights(*args, **kwargs)

    return LowVRAMNF4Ops
