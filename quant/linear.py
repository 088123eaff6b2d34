"""Fp8Linear: an nn.Linear replacement holding an fp8 weight and its fp32 scale.

state_dict() gives `<layer>.weight` (fp8 [out, in]), `<layer>.weight_scale` (fp32 [out] or []) and
`<layer>.bias` (high precision), the in-memory form quant.stream produces and our files store.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .formats import ACT_SCALINGS, COMPUTE_MODES, QuantConfig, format_of_dtype, fp8_format
from .matmul import fp8_linear, resolve_compute
from .scales import quantize_weight

# keep_high_precision(weight_key, shape) -> True to leave that weight unquantized. Supplied from
# outside (the model-family table); quant/ knows no model names.
KeepFilter = Callable[[str, tuple[int, ...]], bool]


def _normalise_scale(scale: torch.Tensor, out_features: int, where: str) -> torch.Tensor:
    """fp32 [] for one element, [out] for one per row; [out, 1] and [1] are accepted and reshaped."""
    if scale.numel() == 1:
        return scale.reshape(()).float()
    if scale.numel() == out_features and scale.ndim <= 2:
        return scale.reshape(out_features).float()
    raise ValueError(
        f"{where}: weight scale of shape {list(scale.shape)} does not fit {out_features} output channels "
        "(expected one value or one per output channel)"
    )


class Fp8Linear(nn.Module):
    """y = x @ (weight * weight_scale).T + bias with weight stored in fp8.

    >>> layer = Fp8Linear.from_linear(nn.Linear(32, 16), QuantConfig(compute="dequant"))
    >>> layer(torch.randn(2, 32)).shape, layer.weight.dtype, tuple(layer.weight_scale.shape)
    (torch.Size([2, 16]), torch.float8_e4m3fn, (16,))
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, fmt: str = "e4m3fn",
        compute: str = "auto", act_scaling: str = "per_token", device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        if compute not in COMPUTE_MODES:
            raise ValueError(f"Fp8Linear compute={compute!r} is not allowed; choose one of: {', '.join(COMPUTE_MODES)}")
        if act_scaling not in ACT_SCALINGS:
            raise ValueError(f"Fp8Linear act_scaling={act_scaling!r} is not allowed; choose one of: {', '.join(ACT_SCALINGS)}")
        self.in_features, self.out_features = in_features, out_features
        self.compute, self.act_scaling = compute, act_scaling
        w = torch.zeros(out_features, in_features, dtype=fp8_format(fmt).dtype, device=device)
        # Parameters (not buffers) so that ComfyUI's memory accounting and .to() treat it as a weight.
        self.weight = nn.Parameter(w, requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(
        cls, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, cfg: QuantConfig
    ) -> "Fp8Linear":
        """Wrap an already-quantized weight (fp8 [out, in]) and its scale without copying."""
        if format_of_dtype(weight.dtype) is None or weight.ndim != 2:
            raise ValueError(f"Fp8Linear needs a 2-D fp8 weight, got {weight.dtype} {list(weight.shape)}")
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, fmt=format_of_dtype(weight.dtype).name,
                    compute=cfg.compute, act_scaling=cfg.act_scaling, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = _normalise_scale(weight_scale, out_features, "Fp8Linear").to(weight.device)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: QuantConfig) -> "Fp8Linear":
        """Quantize an nn.Linear's weight with cfg's format and granularity; the bias keeps its dtype."""
        with torch.no_grad():
            q, scale = quantize_weight(linear.weight.detach(), cfg.format, cfg.granularity)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls.from_quantized(q, scale, bias, cfg)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Assign instead of copy_: the stored scale may be [] or [out] and the weight e4m3fn or e5m2,
        # and copy_ into the existing tensors would reshape-fail or silently re-cast.
        ours = {name: prefix + name for name in ("weight", "weight_scale", "bias")}
        rest = {k: v for k, v in state_dict.items() if k not in ours.values()}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for name, key in ours.items():
            if key in state_dict and key in missing_keys:
                missing_keys.remove(key)
        layer = prefix.rstrip(".") or "Fp8Linear"
        w = state_dict.get(ours["weight"])
        if w is not None:
            if tuple(w.shape) != (self.out_features, self.in_features) or format_of_dtype(w.dtype) is None:
                error_msgs.append(
                    f"{layer}.weight: expected fp8 [{self.out_features}, {self.in_features}], got {w.dtype} {list(w.shape)}"
                )
                return
            self.weight = nn.Parameter(w.to(self.weight.device), requires_grad=False)
        s = state_dict.get(ours["weight_scale"])
        if s is not None:
            try:
                self.weight_scale = _normalise_scale(s, self.out_features, layer).to(self.weight.device)
            except ValueError as e:
                error_msgs.append(str(e))
        b = state_dict.get(ours["bias"])
        if b is not None and self.bias is None:
            unexpected_keys.append(ours["bias"])
        elif b is not None:
            self.bias = nn.Parameter(b.detach().to(self.weight.device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = resolve_compute(self.compute, x.device)
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, mode=mode, act_scaling=self.act_scaling)

    def extra_repr(self) -> str:
        scale = "per_tensor" if self.weight_scale.ndim == 0 else "per_channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.weight.dtype}, scale={scale}, compute={self.compute}")


def quantize_linear_(model: nn.Module, cfg: QuantConfig, keep_high_precision: KeepFilter | None = None) -> list[str]:
    """Replace, in place, every nn.Linear of `model` by an Fp8Linear unless the filter keeps it.

    The filter sees the weight's key (`"blocks.0.attn.qkv.weight"`) and shape, the same call
    quant.stream makes, so one table serves files and modules. Returns the replaced layer names.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if keep_high_precision is not None and keep_high_precision(f"{name}.weight", tuple(module.weight.shape)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear.from_linear(module, cfg))
        swapped.append(name)
    return swapped
