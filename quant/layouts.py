"""Which fp8/bf16 layout a safetensors file uses, decided from its header alone.

Layouts (facts from ComfyUI 0.3.75 `comfy/model_detection.py`, `comfy/ops.py`, QUANTIZATION.md and
ComfyUI >= 0.4's `convert_old_quants`):
- lowvram: our own file (metadata "lowvram.format"); `<layer>.weight` fp8 + `<layer>.weight_scale`.
- weight_scale: ComfyUI mixed precision. `<layer>.weight` fp8 (or uint8 holding fp8 bytes),
  `<layer>.weight_scale` fp32, optional `<layer>.input_scale`; which layers are quantized, and how,
  is in per-layer `<layer>.comfy_quant` uint8 tensors holding UTF-8 JSON ({"format": "float8_e4m3fn"})
  or in a `_quantization_metadata` metadata entry ({"format_version": "1.0", "layers": {layer:
  "float8_e4m3fn" or {"format": ...}}}).
- scaled_fp8: a `scaled_fp8` marker tensor whose dtype is the weights' fp8 dtype (fp32 marker = e4m3fn),
  `<layer>.weight` fp8 + `<layer>.scale_weight` fp32 scalar, optional `<layer>.scale_input`.
- plain_fp8: fp8 weights without any scale (a plain cast; scale 1).
- high_precision: bf16 / fp16 / fp32 weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import QuantFileError, UnsupportedQuantFormatError
from .formats import Fp8Format, format_of_comfy_name
from .safetensors_io import ST_DTYPES
from .saved_format import check_metadata, is_saved_format

QUANT_METADATA_KEY = "_quantization_metadata"
SCALED_FP8_MARKER = "scaled_fp8"
_FP8_ST_DTYPES = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class Layout:
    kind: str
    description: str
    scale_suffix: str | None  # key suffix of an fp8 weight's scale: `<layer><scale_suffix>`
    companions: tuple[str, ...]  # suffixes read with their layer's weight, never passed on
    scale_required: bool  # an fp8 2-D weight without its scale is an error (else scale 1)
    quantize_high_precision: bool  # bf16/fp16/fp32 2-D weights get quantized (else passed on as stored)
    # Our own files hold only values we checked for NaN/inf before saving: their fp8 weights are not read
    # again at load (12 GB for Flux), so reloading one touches no more data than ComfyUI's loader does.
    checked_when_written: bool = False


# Only a high-precision source is quantized by us: in an fp8 file, the layers its author left in
# high precision stay so, and its fp8 weights are never re-quantized (a second rounding only adds error).
LAYOUTS: dict[str, Layout] = {
    lay.kind: lay
    for lay in (
        Layout("lowvram", "LowVRAM Kit fp8", ".weight_scale", (".weight_scale",), True, False, True),
        Layout("weight_scale", "ComfyUI weight_scale/comfy_quant", ".weight_scale",
               (".weight_scale", ".input_scale", ".comfy_quant"), True, False),
        Layout("scaled_fp8", "ComfyUI scaled_fp8", ".scale_weight", (".scale_weight", ".scale_input"), True, False),
        Layout("plain_fp8", "plain fp8 (no scales)", None, (), False, False),
        Layout("high_precision", "bf16/fp16/fp32", None, (), False, True),
    )
}


@dataclass(frozen=True)
class FileHeader:
    """The header of a safetensors file, restricted to the keys under `prefix` (prefix stripped)."""

    path: str
    prefix: str
    st_dtypes: dict[str, str]  # name -> safetensors dtype string ("BF16", "F8_E4M3", ...)
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]

    def dtype(self, name: str) -> torch.dtype | None:
        return ST_DTYPES.get(self.st_dtypes[name])

    def full_key(self, name: str) -> str:
        return self.prefix + name


def read_header(f: object, path: str, prefix: str = "") -> FileHeader:
    """FileHeader from an open `safe_open` handle; reads no tensor data."""
    dtypes, shapes = {}, {}
    for key in f.keys():
        if not key.startswith(prefix):
            continue
        sl = f.get_slice(key)
        name = key[len(prefix):]
        dtypes[name], shapes[name] = sl.get_dtype(), tuple(sl.get_shape())
    if not dtypes:
        raise QuantFileError(f"{path} has no tensors under the prefix {prefix!r}; check the prefix or the file")
    return FileHeader(path, prefix, dtypes, shapes, dict(f.metadata() or {}))


def _has_suffix(h: FileHeader, suffixes: tuple[str, ...]) -> bool:
    return any(name.endswith(suffixes) for name in h.st_dtypes)


# Ordered: the first matching rule names the layout. An fp8 file from ComfyUI >= 0.4 may also hold a
# leftover marker, so weight_scale is tested before scaled_fp8.
_DETECTORS: tuple[tuple[str, Callable[[FileHeader], bool]], ...] = (
    ("lowvram", lambda h: is_saved_format(h.metadata)),
    ("weight_scale", lambda h: QUANT_METADATA_KEY in h.metadata or _has_suffix(h, (".comfy_quant", ".weight_scale"))),
    ("scaled_fp8", lambda h: SCALED_FP8_MARKER in h.st_dtypes),
    ("plain_fp8", lambda h: any(d in _FP8_ST_DTYPES for d in h.st_dtypes.values())),
    ("high_precision", lambda h: True),
)


def detect_layout(h: FileHeader) -> Layout:
    """The layout of a file; a LowVRAM file of another format version is refused here."""
    kind = next(kind for kind, matches in _DETECTORS if matches(h))
    if kind == "lowvram":
        check_metadata(h.metadata, h.path)
    return LAYOUTS[kind]


def quant_metadata_formats(h: FileHeader) -> dict[str, str]:
    """layer name (prefix stripped) -> ComfyUI format name, from the `_quantization_metadata` entry."""
    text = h.metadata.get(QUANT_METADATA_KEY)
    if text is None:
        return {}
    try:
        layers = json.loads(text)["layers"]
        items = layers.items()
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise QuantFileError(f"{h.path}: the {QUANT_METADATA_KEY} metadata entry is malformed ({e!r})") from e
    formats = {}
    for layer, conf in items:
        name = conf.get("format") if isinstance(conf, dict) else conf
        # Layer names are full state-dict keys; files that omit the model prefix exist too.
        layer = layer[len(h.prefix):] if h.prefix and layer.startswith(h.prefix) else layer
        formats[layer] = str(name)
    return formats


def parse_comfy_quant(t: torch.Tensor, layer: str, path: str) -> str:
    """The format name in a `<layer>.comfy_quant` tensor (uint8 bytes of a JSON object)."""
    try:
        conf = json.loads(bytes(t.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
        return str(conf["format"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise QuantFileError(f"{path}: {layer}.comfy_quant is not a JSON object with a 'format' ({e!r})") from e


def fp8_format_for_layer(comfy_name: str, layer: str, path: str) -> Fp8Format:
    """Our Fp8Format for a ComfyUI per-layer format name; other formats are refused, named."""
    fmt = format_of_comfy_name(comfy_name)
    if fmt is None:
        raise UnsupportedQuantFormatError(
            f"{path}: layer {layer} is quantized as {comfy_name!r}, which this fp8 loader does not read "
            "(it reads float8_e4m3fn and float8_e5m2). Use the bf16 original or an fp8 file of the model."
        )
    return fmt
