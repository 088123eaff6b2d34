"""fp8 weight storage for diffusion models in plain PyTorch (no ComfyUI import, no CUDA at import).

Two verbs: make the fp8 state dict (`quantize_file`, streamed from a safetensors memory map; our own
cached file via `save_quantized` / `load_saved`), and compute with it (`Fp8Linear`, `fp8_linear`).
"""

from .errors import (
    CorruptFileError, MissingScaleError, NonFiniteWeightError, QuantFileError, SavedFormatVersionError,
    SaveError, UnsupportedQuantFormatError,
)
from .formats import (
    ACT_SCALINGS, COMPUTE_MODES, FP8_FORMATS, GRANULARITIES, Fp8Format, QuantConfig, format_of_dtype, fp8_format,
)
from .layouts import LAYOUTS, Layout
from .linear import Fp8Linear, KeepFilter, quantize_linear_
from .matmul import fp8_linear, fp8_matmul_supported, resolve_compute
from .saved_format import FORMAT_VERSION, load_saved, save_atomic, save_quantized, saved_source, source_fingerprint
from .scales import amax, dequantize, quantize, quantize_weight, scale_from_amax, sqnr_db
from .stream import QuantizedFile, iter_quantized, quantize_file

__all__ = [
    "ACT_SCALINGS", "COMPUTE_MODES", "FP8_FORMATS", "FORMAT_VERSION", "GRANULARITIES", "LAYOUTS",
    "CorruptFileError", "Fp8Format", "Fp8Linear", "KeepFilter", "Layout", "MissingScaleError",
    "NonFiniteWeightError", "QuantConfig", "QuantFileError", "QuantizedFile", "SaveError",
    "SavedFormatVersionError", "UnsupportedQuantFormatError", "amax", "dequantize", "format_of_dtype",
    "fp8_format", "fp8_linear", "fp8_matmul_supported", "iter_quantized", "load_saved", "quantize",
    "quantize_file", "quantize_linear_", "quantize_weight", "resolve_compute", "save_atomic",
    "save_quantized", "saved_source", "scale_from_amax", "source_fingerprint", "sqnr_db",
]
