"""ComfyUI adapter: custom operations whose Linear stores fp8 weights with per-channel scales.

Passed to ComfyUI as `model_options["custom_operations"]`, the route that keeps ComfyUI's detection, LoRA,
partial loading, async offload and unloading working. A Linear becomes fp8 only if its state dict brings
an fp8 `weight` with a `weight_scale` (quant.quantize_file decides which layers that is); every other
layer is ComfyUI's ordinary manual-cast Linear.

How the fp8 Linear meets ComfyUI:
- forward: ComfyUI's cast_bias_weight moves the weight to the input's device *as fp8* (an offloaded layer
  streams 1 byte per weight, never an upcast copy), then quant.fp8_linear runs torch._scaled_mm or the
  bf16 dequant path; a weight already on the input's device with no weight functions (LoRA in lowvram
  mode) skips cast_bias_weight, which would return it unchanged;
- LoRA: ComfyUI calls convert_weight (raw fp8 -> real values) before and set_weight (real -> fp8 with the
  layer's existing scale) after adding the patch, both when it patches weights in place and through its
  lowvram weight functions; the scale is kept because ComfyUI backs up and restores the weight only.
"""
from __future__ import annotations

import logging

import torch

import comfy.ops

from ..quant import fp8_linear
from ..quant.formats import format_of_dtype

log = logging.getLogger("lowvram")


def make_fp8_ops(compute: str, act_scaling: str = "per_token", cast_weights: bool = True, fast_accum: bool = False):
    """An operations class for ComfyUI; `compute` is "fp8" (torch._scaled_mm) or "dequant" (bf16).
    fast_accum: the fp8 GEMMs skip Hopper's periodic promotion of partial sums to fp32 (faster, measured in
    bench/newbie_dit_fidelity.py for its error).

    cast_weights: whether the layers that stay in high precision (norms, embeddings, kept Linears) cast their
    weights to the input's dtype on every call, as ComfyUI's manual_cast operations do. ComfyUI itself picks
    its cast-free operations when the weights are stored in the dtype the model computes in (bf16 on a GPU
    that has it) and leaves casting to the layers it loads in part; pass False there to do the same. The
    fp8 Linear below handles its own weight either way.
    """
    base = comfy.ops.manual_cast if cast_weights else comfy.ops.disable_weight_init

    class LowVRAMFp8Ops(base):
        class Linear(base.Linear):
            # Read by nodes.comfy_fused_ffn, which runs three such layers as one fused path.
            fp8_compute, fp8_act_scaling, fp8_fast_accum = compute, act_scaling, fast_accum

            def reset_parameters(self):
                self.weight_scale = None
                return None

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                w_key, s_key = prefix + "weight", prefix + "weight_scale"
                w, scale = state_dict.get(w_key), state_dict.get(s_key)
                if w is not None and scale is not None and format_of_dtype(w.dtype) is not None:
                    # Take the tensors as they are (no copy): host RAM holds one fp8 copy of the model.
                    state_dict.pop(w_key)
                    state_dict.pop(s_key)
                    self.weight = torch.nn.Parameter(w, requires_grad=False)
                    self.weight_scale = torch.nn.Parameter(scale.to(torch.float32), requires_grad=False)
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)
                if self.weight_scale is not None:
                    for key in (w_key, s_key):
                        if key in missing_keys:
                            missing_keys.remove(key)

            def forward_comfy_cast_weights(self, input):
                if self.weight_scale is None:
                    return super().forward_comfy_cast_weights(input)
                weight, bias, stream = comfy.ops.cast_bias_weight(
                    self, input, dtype=self.weight.dtype, bias_dtype=input.dtype, offloadable=True)
                scale = self.weight_scale.to(weight.device, non_blocking=True)
                # With LoRA in lowvram mode the weight functions return fp8 *values* in fp32: dequant path.
                mode = compute if weight.dtype == self.weight.dtype else "dequant"
                out = fp8_linear(input, weight, scale, bias, out_dtype=input.dtype, mode=mode,
                                 act_scaling=act_scaling, fast_accum=fast_accum)
                comfy.ops.uncast_bias_weight(self, weight, bias, stream)
                return out

            def in_place_for(self, input) -> bool:
                """Whether this fp8 layer's tensors serve `input` as they are: the weight on its device (resident,
                or streamed into place by ChunkedOffloadUNet) and no weight functions (LoRA in lowvram mode).
                Also asked by nodes.comfy_fused_ffn for the three layers it fuses."""
                return (self.weight_scale is not None and self.weight.device == input.device
                        and not self.weight_function and not self.bias_function)

            def forward(self, input, *args, **kwargs):
                if self.weight_scale is None:
                    return super().forward(input, *args, **kwargs)
                weight = self.weight
                if self.in_place_for(input):
                    # Resident (or streamed into place by ChunkedOffloadUNet): cast_bias_weight would hand
                    # back these very tensors, after host work on every call; a one-image NewBie call has
                    # 238 such layers and is bound by the host (bench/results/eager_launch_bound_*). The
                    # bias is cast by the GEMM path itself.
                    return fp8_linear(input, weight, self.weight_scale, self.bias, out_dtype=input.dtype,
                                      mode=compute, act_scaling=act_scaling, fast_accum=fast_accum)
                return self.forward_comfy_cast_weights(input, *args, **kwargs)

            def _rows(self, t: torch.Tensor) -> torch.Tensor:
                s = self.weight_scale.to(device=t.device, dtype=t.dtype)
                return s.reshape(-1, *([1] * (t.ndim - 1))) if s.ndim == 1 else s

            def convert_weight(self, weight, inplace=False, **kwargs):
                if self.weight_scale is None:
                    return weight
                if inplace:
                    weight *= self._rows(weight)
                    return weight
                return weight.to(torch.float32) * self._rows(weight.to(torch.float32))

            def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
                if self.weight_scale is None:
                    weight = weight.to(self.weight.dtype)
                else:
                    fmt = format_of_dtype(self.weight.dtype)
                    q = weight.to(torch.float32) / self._rows(weight.to(torch.float32))
                    weight = q.clamp_(-fmt.max_finite, fmt.max_finite).to(self.weight.dtype)
                if return_weight:
                    return weight
                if inplace_update:
                    self.weight.data.copy_(weight)
                else:
                    self.weight = torch.nn.Parameter(weight, requires_grad=False)

    return LowVRAMFp8Ops
