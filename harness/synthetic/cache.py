"""ensure(): write a synthetic model file once, reuse it while its metadata still matches."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .registry import SPEC_VERSION, get
from .spec import total_bytes
from .writer import Progress, build_header, read_header, write_sparse, write_specs

META_KEY = "lowvram.synthetic"
DEFAULT_SEED = 0
# Fields that must match for a cached file to be reused (the generating device is recorded, not compared).
MATCH_FIELDS = ("name", "size", "spec_version", "seed")
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_models_dir(size: str) -> Path:
    return REPO_ROOT / ".cache" / "models" / f"synthetic-{size}"


def model_path(name: str, size: str, models_dir: str | os.PathLike | None = None) -> Path:
    e = get(name)
    return Path(models_dir or default_models_dir(size)) / e.folder / e.filename


def synthetic_info(name: str, size: str, seed: int, device: str = "cpu") -> dict:
    e = get(name)
    info = {"name": name, "size": size, "spec_version": SPEC_VERSION, "seed": seed,
            "config": e.config_dict(size), "rng_device": torch.device(device).type}
    if size in e.model_options:
        info["model_options"] = e.model_options[size]
    return info


def file_metadata(info: dict) -> dict[str, str]:
    return {"format": "pt", META_KEY: json.dumps(info, sort_keys=True)}


def read_info(path: str | os.PathLike) -> dict | None:
    """The `lowvram.synthetic` record of a file, or None if it has none or is not a safetensors file."""
    try:
        meta = read_header(path).get("__metadata__") or {}
        return json.loads(meta[META_KEY]) if META_KEY in meta else None
    except (OSError, ValueError, KeyError):
        return None


def model_options(path: str | os.PathLike) -> dict:
    """The ComfyUI `model_options` a loader must pass for this file ({} for most files)."""
    info = read_info(path) or {}
    return info.get("model_options", {})


def merged_model_options(paths) -> dict:
    """One model_options dict for text encoders loaded together (e.g. clip_l + t5xxl for Flux).

    Two files asking for different values under one key cannot share a loader call: that raises.
    """
    merged: dict = {}
    for p in paths:
        for k, v in model_options(p).items():
            if k in merged and merged[k] != v:
                raise ValueError(f"{p}: model_options[{k!r}] = {v} conflicts with {merged[k]} from another "
                                 "file; load these text encoders separately")
            merged[k] = v
    return merged


def is_current(path: str | os.PathLike, name: str, size: str, seed: int) -> bool:
    """True when `path` was written for (name, size, seed) by this SPEC_VERSION, its tensor table
    (keys, shapes, dtypes, offsets) equals the current spec's, and no byte is missing."""
    info = read_info(path)
    want = {"name": name, "size": size, "spec_version": SPEC_VERSION, "seed": seed}
    if info is None or info.get("sparse") or any(info.get(k) != want[k] for k in MATCH_FIELDS):
        return False
    header = read_header(path)
    header.pop("__metadata__", None)
    expected = json.loads(build_header(get(name).specs(size), {})[8:])
    if header != expected:
        return False
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    return os.path.getsize(path) == 8 + header_len + end


def ensure(name: str, size: str = "tiny", models_dir: str | os.PathLike | None = None,
           device: str = "cpu", seed: int = DEFAULT_SEED, progress: Progress | None = None) -> Path:
    """Path of the synthetic file for (name, size), written first if missing or stale.

    >>> import tempfile
    >>> p = ensure("flux-dev", "tiny", tempfile.mkdtemp()) # doctest: +SKIP
    """
    path = model_path(name, size, models_dir)
    if path.exists() and is_current(path, name, size, seed):
        return path
    e = get(name)
    write_specs(path, e.specs(size), file_metadata(synthetic_info(name, size, seed, device)), seed,
                device, progress)
    return path


def write_sparse_model(name: str, size: str, path: str | os.PathLike, seed: int = DEFAULT_SEED) -> int:
    """A header-only sparse look-alike of (name, size) at `path`; returns its logical length."""
    info = synthetic_info(name, size, seed)
    info["sparse"] = True
    return write_sparse(path, get(name).specs(size), file_metadata(info))


def model_bytes(name: str, size: str) -> int:
    return total_bytes(get(name).specs(size))
