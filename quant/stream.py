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

`device`: "cpu" quantizes here, row block by row block (the least host RAM). A CUDA device quantizes
there (quant.device_quant: the same bytes, several times faster: the CPU only copies the file's pages
into a pinned buffer and the fp8 results out of one).
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .device_quant import SCALE_FROM_ROW_AMAX, DeviceJob, DeviceQuantizer
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
# fp8 bit patterns that are not finite, as (byte & mask) == mask: e4m3fn has only NaN, S.1111.111;
# e5m2 has inf and NaN, exponent S.11111.xx. Testing bytes is ~15x faster than casting to fp16.
_NONFINITE_MASK = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


@dataclass(frozen=True)
class QuantizedFile:
    """The normalised state dict of a file and what was done to each weight."""

    state_dict: dict[str, torch.Tensor]
    layout: str  # a quant.layouts.LAYOUTS kind
    quantized: tuple[str, ...]  # weights quantized now from high precision
    fp8_source: tuple[str, ...]  # weights already fp8 in the file, passed on with their scale
    kept: tuple[str, ...]  # weights the filter kept in high precision
    file_config: QuantConfig | None  # the config recorded in one of our files


# progress(tensors done, tensors in the file)
Progress = Callable[[int, int], None]


def _never_keep(_name: str, _shape: tuple[int, ...]) -> bool:
    return False


def _check_finite(t: torch.Tensor, name: str, path: str, row0: int = 0) -> None:
    """Raise NonFiniteWeightError naming the tensor (and first bad row) if `t` holds NaN or inf."""
    mask = _NONFINITE_MASK.get(t.dtype)
    if t.numel() == 0 or (t.dtype not in _HIGH_PRECISION and mask is None):
        return
    flat_rows = t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(-1, 1)
    step = max(1, BLOCK_ELEMS // max(1, flat_rows.shape[1]))
    for r0 in range(0, flat_rows.shape[0], step):
        block = flat_rows[r0 : r0 + step]
        if mask is None:
            ok = torch.isfinite(amax(block, "per_channel"))  # the row amax is NaN/inf iff the row has one
        else:
            u = block.view(torch.uint8)
            if int(torch.bitwise_or(u, 0xFF ^ mask).max()) != 0xFF:  # one pass: no byte has all mask bits
                continue
            ok = ~(torch.bitwise_and(u, mask) == mask).any(dim=1)
        if not bool(ok.all()):
            bad = row0 + r0 + int((~ok).nonzero()[0, 0])
            raise NonFiniteWeightError(
                f"{path}: tensor {name} contains NaN or inf values (first in row {bad}). The file is damaged "
                "or was saved from a diverged model; use another copy of the model."
            )


# Bytes handed out through one memory map before _Reader opens a fresh one (see _Reader).
REOPEN_BYTES = 1 << 30


class _Reader:
    """One file: its header, layout and per-layer formats, and tensor reads that name the file.

    The memory map is reopened after every REOPEN_BYTES of tensors read through it: while a map is
    open, every page read through it counts in the process's resident memory (RssFile), so one map for
    the whole load would show the whole source file as resident by the end; and one map per tensor
    costs a header parse per tensor (0.7 ms each for Flux's 780 tensors: half a second per load).
    Call close() when done (the stream functions do).
    """

    def __init__(self, path: str, prefix: str) -> None:
        self.path = path
        with open_safetensors(path) as f:
            self.header: FileHeader = read_header(f, path, prefix)
        self.layout: Layout = detect_layout(self.header)
        self.formats = quant_metadata_formats(self.header) if self.layout.kind == "weight_scale" else {}
        self._open: contextlib.ExitStack | None = None
        self._handle = None
        self._handed_out = 0

    def has(self, name: str) -> bool:
        return name in self.header.st_dtypes

    def tensor(self, name: str) -> torch.Tensor:
        if self._open is None:
            self._open = contextlib.ExitStack()
            self._handle = self._open.enter_context(open_safetensors(self.path))
        t = read_tensor(self._handle, self.header.full_key(name), self.path)
        self._handed_out += t.numel() * t.element_size()
        if self._handed_out >= REOPEN_BYTES:
            self.close()
        return t

    def close(self) -> None:
        """Close the current map; tensors already read keep theirs alive until they are freed."""
        if self._open is not None:
            self._open.close()
        self._open, self._handle, self._handed_out = None, None, 0

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
                block_scale = SCALE_FROM_ROW_AMAX[cfg.granularity](row_amax, fmt)
            quantize(block, block_scale, fmt, out=q[r0:r1])
    return q, SCALE_FROM_ROW_AMAX[cfg.granularity](row_amax, fmt)


def _quantizes(r: _Reader, name: str, keep: KeepFilter) -> bool:
    """True for a high-precision 2-D `.weight` this file's layout has us quantize (not kept)."""
    shape, dtype = r.header.shapes[name], r.header.dtype(name)
    return (dtype in _HIGH_PRECISION and name.endswith(".weight") and len(shape) == 2
            and r.layout.quantize_high_precision and not keep(name, shape))


def _device_quantizer(r: _Reader, cfg: QuantConfig, keep: KeepFilter, device: torch.device) -> DeviceQuantizer | None:
    """A DeviceQuantizer whose staging buffers fit the largest weight to quantize (None: nothing to do)."""
    todo = [name for name in r.header.st_dtypes if not r.is_companion(name) and _quantizes(r, name, keep)]
    if not todo:
        return None
    numel = {name: math.prod(r.header.shapes[name]) for name in todo}
    src_bytes = max(numel[name] * r.header.dtype(name).itemsize for name in todo)
    return DeviceQuantizer(device, src_bytes, max(numel.values()) * cfg.format.dtype.itemsize)


def _ready(waiting: deque, path: str, drain: bool) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Pop items off the front of `waiting` while they are ready (all of them with `drain`).

    A DeviceJob is ready once its weight is back in host memory; the items behind it wait, so the
    state dict keeps the file's order.
    """
    while waiting:
        head = waiting[0]
        if isinstance(head, DeviceJob):
            if not (head.done or drain):
                return
            q, scale, row_amax = head.result()
            _check_finite(row_amax, head.name, path)  # amax propagates NaN: the device path's check
            waiting.popleft()
            yield head.name, q, "quantized"
            yield f"{head.name[: -len('.weight')]}.weight_scale", scale, "scale"
        else:
            yield waiting.popleft()


def _iter_with_actions(
    r: _Reader, cfg: QuantConfig, keep: KeepFilter, device: str | torch.device = "cpu", device_path: bool | None = None
) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(key, tensor, action) in file order. `device_path` (default: device is not the CPU) quantizes
    through quant.device_quant, which also runs on the CPU (the tests compare the two paths there)."""
    device = torch.device(device)
    use_device = device.type != "cpu" if device_path is None else device_path
    dq = _device_quantizer(r, cfg, keep, device) if use_device else None
    waiting: deque = deque()  # (key, tensor, action) triples and DeviceJobs
    try:
        for name, st_dtype in r.header.st_dtypes.items():
            if r.is_companion(name):
                continue
            _read_one(r, name, st_dtype, cfg, keep, dq, waiting)
            yield from _ready(waiting, r.path, drain=False)
        yield from _ready(waiting, r.path, drain=True)
    finally:
        r.close()
        if dq is not None:
            dq.close()


def _read_one(r: _Reader, name: str, st_dtype: str, cfg: QuantConfig, keep: KeepFilter, dq: DeviceQuantizer | None,
              waiting: deque) -> None:
    """Append what tensor `name` becomes to `waiting`: triples, or a DeviceJob still in flight."""
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
        if not r.layout.checked_when_written:
            _check_finite(q, name, r.path)
        scale = r.scale_for(layer, declared is not None, shape[0] if shape else 1, required=is_weight)
        if is_weight and not keep(name, shape):
            waiting.extend(((name, q, "fp8_source"), (f"{layer}.weight_scale", scale, "scale")))
        else:
            # A kept layer, or an fp8 tensor that is no matmul weight (bias, norm, conv kernel).
            waiting.append((name, dequantize(q, scale, torch.bfloat16), "kept" if is_weight else "passed"))
    elif _quantizes(r, name, keep):
        if dq is not None:
            waiting.append(dq.submit(name, r.tensor(name), cfg))  # a memory-mapped view: no copy yet
        else:
            q, scale = _quantize_rows(r, name, shape, cfg)
            waiting.extend(((name, q, "quantized"), (f"{layer}.weight_scale", scale, "scale")))
    else:
        t = r.tensor(name)
        _check_finite(t, name, r.path)
        waiting.append((name, t, "kept" if is_weight and dtype in _HIGH_PRECISION else "passed"))


def iter_quantized(
    path: str, cfg: QuantConfig, keep_high_precision: KeepFilter | None = None, prefix: str = "",
    device: str | torch.device = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of the normalised state dict, one tensor in memory at a time (two with a
    CUDA `device`: the pipeline is one weight deep).

    `keep_high_precision(weight_key, shape)` (keys without prefix) names layers to leave unquantized.
    """
    r = _Reader(path, prefix)
    for key, t, _action in _iter_with_actions(r, cfg, keep_high_precision or _never_keep, device):
        yield key, t


def quantize_file(
    path: str, cfg: QuantConfig, keep_high_precision: KeepFilter | None = None, prefix: str = "",
    device: str | torch.device = "cpu", progress: Progress | None = None,
) -> QuantizedFile:
    """Read `path` into the normalised fp8 state dict (see the module docstring), with a report.

    `prefix`: e.g. "model.diffusion_model." to take only the diffusion model of an all-in-one checkpoint.
    `device`: where high-precision weights are quantized ("cpu", or a CUDA device: same bytes, faster).
    `progress(done, total)`: called after each tensor of the file (scales not counted); an exception it
    raises (a cancelled prompt) stops the load, and everything read so far is dropped.
    """
    sd: dict[str, torch.Tensor] = {}
    done: dict[str, list[str]] = {"quantized": [], "fp8_source": [], "kept": [], "passed": [], "scale": []}
    r = _Reader(path, prefix)
    total = sum(1 for name in r.header.st_dtypes if not r.is_companion(name))
    for key, t, action in _iter_with_actions(r, cfg, keep_high_precision or _never_keep, device):
        sd[key] = t
        done[action].append(key)
        if progress is not None and action != "scale":
            progress(len(sd) - len(done["scale"]), total)
    file_cfg = check_metadata(r.header.metadata, path) if r.layout.kind == "lowvram" else None
    return QuantizedFile(sd, r.layout.kind, tuple(done["quantized"]), tuple(done["fp8_source"]),
                         tuple(done["kept"]), file_cfg)
