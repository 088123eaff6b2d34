"""Streaming load: a safetensors file -> {`<layer>.weight`: fp8, `<layer>.weight_scale`: fp32 [out] or [],
everything else as stored}, read tensor by tensor (and high-precision weights row block by row block)
from the memory map, so host RAM holds the result plus one block, never the source and the result.

Whatever the source layout (see quant.layouts), the result has that one form:
- high-precision 2-D `.weight`s are quantized with the config unless `keep_high_precision` keeps them;
- fp8 weights keep their stored bytes and get their file's scale (plain fp8: scale 1); kept layers and
  fp8 tensors that are not 2-D weights are dequantized to bf16;
- activation scales (`scale_input`, `input_scale`) and markers are dropped: the fp8 matmul scales
  activations dynamically, per token or per call.
Keys are returned without `prefix`; tensors outside the prefix are not read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .errors import CorruptFileError, MissingScaleError, NonFiniteWeightError, QuantFileError
from .formats import Fp8Format, QuantConfig, format_of_dtype
from .layouts import (
    SCALED_FP8_MARKER, FileHeader, Layout, detect_layout, fp8_format_for_layer, parse_comfy_quant,
    quant_metadata_formats, read_header,
)
from .linear import KeepFilter
from .safetensors_io import safetensor_error_types, open_safetensors, read_tensor
from .saved_format import check_metadata
from .scales import BLOCK_ELEMS, amax, dequantize, quantize, scale_from_amax

_HIGH_PRECISION = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class QuantizedFile:
    """The normalised state dict of a file and what was done to each weight."""

    state_dict: dict[str, torch.Tensor]
    layout: str  # a quant.layouts.LAYOUTS kind
    quantized: tuple[str, ...]  # weights quantized now from high precision
    fp8_source: tuple[str, ...]  # weights already fp8 in the file, passed on with their scale
    kept: tuple[str, ...]  # weights the filter kept in high precision
    file_config: QuantConfig | None  # the config recorded in one of our files


def _never_keep(_name: str, _shape: tuple[int, ...]) -> bool:
    return False


def _check_finite(t: torch.Tensor, name: str, path: str, row0: int = 0) -> None:
    """Raise NonFiniteWeightError naming the tensor (and first bad row) if `t` holds NaN or inf."""
    if t.numel() == 0 or (t.dtype not in _HIGH_PRECISION and format_of_dtype(t.dtype) is None):
        return
    flat_rows = t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(-1, 1)
    step = max(1, BLOCK_ELEMS // max(1, flat_rows.shape[1]))
    for r0 in range(0, flat_rows.shape[0], step):
        block = flat_rows[r0 : r0 + step]
        # isfinite is not implemented for fp8 dtypes; fp16 holds every e4m3fn/e5m2 value exactly.
        ok = torch.isfinite(block if block.dtype in _HIGH_PRECISION else block.to(torch.float16)).all(dim=1)
        if not bool(ok.all()):
            bad = row0 + r0 + int((~ok).nonzero()[0, 0])
            raise NonFiniteWeightError(
                f"{path}: tensor {name} contains NaN or inf values (first in row {bad}). The file is damaged "
                "or was saved from a diverged model; use another copy of the model."
            )


class _Reader:
    """One file: its header, layout and per-layer formats, and tensor reads that name the file.

    The memory map is opened per tensor, not once: while a map is open, every page read through it
    counts in the process's resident memory (RssFile) until it is closed, so one long-lived map
    would show the whole source file as resident by the end. Reopening costs one header parse.
    """

    def __init__(self, path: str, prefix: str) -> None:
        self.path = path
        with open_safetensors(path) as f:
            self.header: FileHeader = read_header(f, path, prefix)
        self.layout: Layout = detect_layout(self.header)
        self.formats = quant_metadata_formats(self.header) if self.layout.kind == "weight_scale" else {}

    def has(self, name: str) -> bool:
        return name in self.header.st_dtypes

    def tensor(self, name: str) -> torch.Tensor:
        with open_safetensors(self.path) as f:
            return read_tensor(f, self.header.full_key(name), self.path)

    @contextlib.contextmanager
    def row_reader(self, name: str) -> Iterator[Callable[[int, int], torch.Tensor]]:
        """A function reading rows [r0, r1) of tensor `name`, valid inside the `with`."""
        with open_safetensors(self.path) as f:
            sl = f.get_slice(self.header.full_key(name))

            def rows(r0: int, r1: int) -> torch.Tensor:
                try:
                    return sl[r0:r1]
                except safetensor_error_types() + (OSError, RuntimeError, ValueError) as e:
                    raise CorruptFileError(
                        f"{self.path}: reading rows {r0}:{r1} of {name} failed ({e}); re-download the file"
                    ) from e

            yield rows

    def is_companion(self, name: str) -> bool:
        """True for scale/marker tensors that belong to a layer's weight (or to the file's layout)."""
        if name == SCALED_FP8_MARKER:
            return True
        return any(name.endswith(sfx) for sfx in self.layout.companions)

    def layer_format(self, layer: str, stored: torch.dtype | None) -> Fp8Format | None:
        """The fp8 format a weight_scale-layout file declares for `layer` (None: not declared)."""
        if self.has(f"{layer}.comfy_quant"):
            name = parse_comfy_quant(self.tensor(f"{layer}.comfy_quant"), layer, self.path)
        elif layer in self.formats:
            name = self.formats[layer]
        else:
            return None
        fmt = fp8_format_for_layer(name, layer, self.path)
        if stored not in (fmt.dtype, torch.uint8):
            raise QuantFileError(f"{self.path}: layer {layer} is declared {name} but its weight is stored as {stored}")
        return fmt

    def scale_for(self, layer: str, declared: bool, out_features: int, required: bool) -> torch.Tensor:
        """The fp32 scale of an fp8 tensor ([] or [out]); 1 where the layout has none.

        Missing is an error for a 2-D weight (`required`) when the layout says scales exist: always in
        scaled_fp8 and our files; in weight_scale files for the layers declared quantized (for all fp8
        weights when the file declares none).
        """
        suffix = self.layout.scale_suffix
        if suffix is None or not self.has(layer + suffix):
            required = required and self.layout.scale_required and (declared or not self.formats)
            if suffix is not None and required:
                raise MissingScaleError(
                    f"{self.path}: layer {layer} has an fp8 weight but no {layer}{suffix}, which a "
                    f"{self.layout.description} file must have. The file is incomplete or was converted "
                    "wrongly; use another copy or the bf16 original."
                )
            return torch.ones((), dtype=torch.float32)
        scale = self.tensor(layer + suffix).float()
        _check_finite(scale.reshape(-1), layer + suffix, self.path)
        if scale.numel() == 1:
            return scale.reshape(())
        if scale.numel() == out_features and scale.ndim <= 2:
            return scale.reshape(out_features)
        raise QuantFileError(
            f"{self.path}: {layer}{suffix} has shape {list(scale.shape)}; this loader reads one scale per "
            f"tensor or one per output channel ({out_features}), not block scales"
        )


# granularity -> the weight's scale from its per-row amax [out]: [out], [] or 1.
_SCALE_FROM_ROW_AMAX: dict[str, Callable[[torch.Tensor, Fp8Format], torch.Tensor]] = {
    "per_channel": lambda row_amax, fmt: scale_from_amax(row_amax, fmt),
    "per_tensor": lambda row_amax, fmt: scale_from_amax(row_amax.max(), fmt),
    "none": lambda row_amax, fmt: torch.ones((), dtype=torch.float32),
}


def _quantize_rows(r: _Reader, name: str, shape: tuple[int, ...], cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a high-precision [out, in] weight reading a block of rows at a time from the memory map.

    Peak extra host memory: one block of source rows and its fp32 temporary (~24 MiB), never the
    whole source tensor. The row amax doubles as the NaN/inf check (amax propagates NaN). Per-tensor
    scaling reads the blocks twice (amax first); the second pass comes from the page cache.
    """
    out_features = shape[0]
    rows = max(1, BLOCK_ELEMS // max(1, shape[1]))
    spans = [(r0, min(r0 + rows, out_features)) for r0 in range(0, out_features, rows)]
    fmt = cfg.format
    row_amax = torch.empty(out_features, dtype=torch.float32)

    def read_checked(r0: int, r1: int) -> torch.Tensor:
        block = rows(r0, r1)
        row_amax[r0:r1] = amax(block, "per_channel")
        _check_finite(row_amax[r0:r1], name, r.path, r0)
        return block

    per_tensor = cfg.granularity == "per_tensor"
    q = torch.empty(shape, dtype=fmt.dtype)
    with r.row_reader(name) as rows:
        if per_tensor:  # pass 1: the amax of the whole tensor
            for r0, r1 in spans:
                read_checked(r0, r1)
        for r0, r1 in spans:
            block = rows(r0, r1) if per_tensor else read_checked(r0, r1)
            if cfg.granularity == "per_channel":
                block_scale = scale_from_amax(row_amax[r0:r1], fmt)
            else:
                block_scale = _SCALE_FROM_ROW_AMAX[cfg.granularity](row_amax, fmt)
            quantize(block, block_scale, fmt, out=q[r0:r1])
    return q, _SCALE_FROM_ROW_AMAX[cfg.granularity](row_amax, fmt)


def _iter_with_actions(r: _Reader, cfg: QuantConfig, keep: KeepFilter) -> Iterator[tuple[str, torch.Tensor, str]]:
    for name, st_dtype in r.header.st_dtypes.items():
        if r.is_companion(name):
            continue
        shape, dtype = r.header.shapes[name], r.header.dtype(name)
        if dtype is None:
            raise QuantFileError(f"{r.path}: tensor {name} has dtype {st_dtype}, which this loader does not read")
        is_weight = name.endswith(".weight") and len(shape) == 2
        layer = name[: -len(".weight")] if name.endswith(".weight") else name
        declared = r.layer_format(layer, dtype) if is_weight and r.layout.kind == "weight_scale" else None
        fmt = declared if declared is not None else format_of_dtype(dtype)
        if fmt is not None:
            # Already fp8 in the file; uint8 bytes of a declared fp8 layer are viewed as fp8.
            q = r.tensor(name)
            q = q.view(fmt.dtype) if q.dtype == torch.uint8 else q
            _check_finite(q, name, r.path)
            scale = r.scale_for(layer, declared is not None, shape[0] if shape else 1, required=is_weight)
            if is_weight and not keep(name, shape):
                yield name, q, "fp8_source"
                yield f"{layer}.weight_scale", scale, "scale"
            else:
                # A kept layer, or an fp8 tensor that is no matmul weight (bias, norm, conv kernel).
                yield name, dequantize(q, scale, torch.bfloat16), "kept" if is_weight else "passed"
        elif dtype in _HIGH_PRECISION and is_weight and r.layout.quantize_high_precision and not keep(name, shape):
            q, scale = _quantize_rows(r, name, shape, cfg)
            yield name, q, "quantized"
            yield f"{layer}.weight_scale", scale, "scale"
        else:
            t = r.tensor(name)
            _check_finite(t, name, r.path)
            yield name, t, "kept" if is_weight and dtype in _HIGH_PRECISION else "passed"


def iter_quantized(
    path: str, cfg: QuantConfig, keep_high_precision: KeepFilter | None = None, prefix: str = ""
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of the normalised state dict, one tensor in memory at a time.

    `keep_high_precision(weight_key, shape)` (keys without prefix) names layers to leave unquantized.
    """
    r = _Reader(path, prefix)
    for key, t, _action in _iter_with_actions(r, cfg, keep_high_precision or _never_keep):
        yield key, t


def quantize_file(
    path: str, cfg: QuantConfig, keep_high_precision: KeepFilter | None = None, prefix: str = ""
) -> QuantizedFile:
    """Read `path` into the normalised fp8 state dict (see the module docstring), with a report.

    `prefix`: e.g. "model.diffusion_model." to take only the diffusion model of an all-in-one checkpoint.
    """
    sd: dict[str, torch.Tensor] = {}
    done: dict[str, list[str]] = {"quantized": [], "fp8_source": [], "kept": [], "passed": [], "scale": []}
    r = _Reader(path, prefix)
    for key, t, action in _iter_with_actions(r, cfg, keep_high_precision or _never_keep):
        sd[key] = t
        done[action].append(key)
    file_cfg = check_metadata(r.header.metadata, path) if r.layout.kind == "lowvram" else None
    return QuantizedFile(sd, r.layout.kind, tuple(done["quantized"]), tuple(done["fp8_source"]),
                         tuple(done["kept"]), file_cfg)
