"""Reading safetensors headers with clear errors, and a streaming safetensors writer.

The writer exists because it writes one tensor at a time from its own memory (no second copy of the
state dict in host RAM on any safetensors version) and because every write goes through
`_write_chunk`, the one place a full disk shows up.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from typing import BinaryIO

import torch

from .errors import CorruptFileError

# safetensors header dtype string -> torch dtype (the spec's names).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAME = {v: k for k, v in ST_DTYPES.items()}
_WRITE_CHUNK_BYTES = 64 << 20  # bounds the temporary numpy view handed to one write call


def safetensor_error_types() -> tuple[type[BaseException], ...]:
    """The exception safetensors raises for a bad file (its class moved between versions)."""
    import safetensors

    err = getattr(safetensors, "SafetensorError", None)
    return (err,) if isinstance(err, type) else ()


def _corrupt(path: str, detail: object) -> CorruptFileError:
    return CorruptFileError(
        f"{path} cannot be read as a safetensors file ({detail}). It is truncated or corrupt: "
        "re-download it or copy it again, and check the disk has room."
    )


@contextlib.contextmanager
def open_safetensors(path: str) -> Iterator[object]:
    """`safe_open(path)` (memory-mapped, CPU) whose open errors name the file and the fix."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except safetensor_error_types() + (OSError, RuntimeError, ValueError) as e:
        raise _corrupt(path, e) from e
    with handle as f:
        yield f


def read_tensor(f: object, key: str, path: str) -> torch.Tensor:
    """f.get_tensor(key) with a read error turned into a message naming file and tensor."""
    try:
        return f.get_tensor(key)
    except safetensor_error_types() + (OSError, RuntimeError, ValueError) as e:
        raise _corrupt(path, f"tensor {key}: {e}") from e


def st_dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _ST_NAME:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors; allowed: {sorted(map(str, _ST_NAME))}")
    return _ST_NAME[dtype]


def _write_chunk(fh: BinaryIO, data: memoryview) -> None:
    fh.write(data)


def _tensor_bytes(t: torch.Tensor) -> Iterator[memoryview]:
    """The raw little-endian bytes of `t` in chunks, without copying a contiguous CPU tensor."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8)
    for start in range(0, raw.numel(), _WRITE_CHUNK_BYTES):
        yield memoryview(raw[start : start + _WRITE_CHUNK_BYTES].numpy())


def write_safetensors(fh: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> int:
    """Write `tensors` to the open binary file `fh` in safetensors layout; returns bytes written.

    Layout: u64 little-endian header length, JSON header (padded with spaces to 8 bytes), data.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": st_dtype_name(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    _write_chunk(fh, memoryview(struct.pack("<Q", len(blob))))
    _write_chunk(fh, memoryview(blob))
    for t in tensors.values():
        for chunk in _tensor_bytes(t):
            _write_chunk(fh, chunk)
    return 8 + len(blob) + offset
