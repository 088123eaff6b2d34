"""ComfyUI adapter: load a diffusion model file as fp8 through ComfyUI's own loader.

file -> header (family, prefix) -> quant.quantize_file (tensor by tensor from the memory map, quantized
on ComfyUI's CUDA device when it has one) -> comfy.sd.load_diffusion_model_state_dict(custom_operations=
fp8 ops) -> ModelPatcher.
The fp8 tensors are handed to the model without a copy, so host RAM holds one fp8 model.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TypeVar

import torch

import comfy.model_management
import comfy.sd

from ..quant import QuantConfig, quantize_file, resolve_compute, save_quantized, saved_source, source_fingerprint
from ..quant.layouts import read_header
from ..quant.safetensors_io import open_safetensors
from ._comfy_progress import LoadProgress
from ._device_reservations import reserve
from .comfy_fp8_ops import make_fp8_ops
from .comfy_fused_ffn import add_fused_ffn_patches
from .model_families import Family, UnknownFamilyError, detect_family, keep_filter, parse_layer_patterns

T = TypeVar("T")

log = logging.getLogger("lowvram")
CHECKPOINT_PREFIX = "model.diffusion_model."
# Dtype of the layers that stay in high precision, per family (what the families were trained in).
HIGH_PRECISION_DTYPE = {"sdxl": torch.float16}
# Beside the weights in flight: the row blocks' fp32 temporaries and the allocator's rounding.
QUANTIZER_SLACK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Fp8LoadConfig:
    quant: QuantConfig
    high_precision_layers: str = "auto"
    save_copy_to: str | None = None  # path of the quantized copy to write, or None
    # The fp8 GEMMs' fast accumulation: how to compute, not how the weights are stored (no saved copy records it).
    fast_accum: bool = False


@dataclass(frozen=True)
class Fp8LoadReport:
    family: str
    layout: str
    compute: str
    quantized_layers: int
    fp8_source_layers: int
    kept_layers: int
    seconds: float
    saved_copy: str | None
    reused_copy: str | None = None   # a current saved copy loaded instead of quantizing the source again
    fast_accum: bool = False

    def text(self) -> str:
        return (f"{self.family}: {self.quantized_layers} layers quantized, {self.fp8_source_layers} fp8 from the "
                f"file, {self.kept_layers} kept in high precision; compute {self.compute}"
                + (" with fast accumulation" if self.fast_accum and self.compute == "fp8" else "")
                + f"; source layout {self.layout}; {self.seconds:.1f} s"
                + (f"; saved {self.saved_copy}" if self.saved_copy else "")
                + (f"; loaded the saved copy {self.reused_copy}, which is current" if self.reused_copy else ""))


def copy_source(path: str, cfg: Fp8LoadConfig) -> str:
    """What a saved copy records of how it was made: the source file (name, size, mtime), the fp8 format and
    scale granularity, and the layers kept in high precision. A change to any of them makes a new copy."""
    made_from = json.loads(source_fingerprint(path))
    made_from.update(fmt=cfg.quant.fmt, granularity=cfg.quant.granularity,
                     high_precision_layers=cfg.high_precision_layers)
    return json.dumps(made_from, sort_keys=True)


def inspect_file(path: str) -> tuple[Family, str]:
    """(family, prefix) of a model file from its header alone."""
    with open_safetensors(path) as f:
        keys = list(f.keys())
        prefix = CHECKPOINT_PREFIX if any(k.startswith(CHECKPOINT_PREFIX) for k in keys) else ""
        header = read_header(f, path, prefix)
    shapes = {k: SimpleNamespace(shape=s) for k, s in header.shapes.items()}
    try:
        return detect_family(shapes), prefix
    except UnknownFamilyError as e:   # the family table does not know the path: name the file and its folder
        raise UnknownFamilyError(f"{os.path.basename(path)} (in {os.path.dirname(path)}): {e}") from None


def quantization_device() -> torch.device:
    """ComfyUI's device where it is CUDA (quantizing there is several times faster), else the CPU."""
    device = comfy.model_management.get_torch_device()
    return device if device.type == "cuda" else torch.device("cpu")


def quantize_on_device(read: Callable[[torch.device], T]) -> T:
    """read(quantization_device()), or read(cpu) when the GPU has too little free memory for it (same bytes)."""
    device = quantization_device()
    try:
        return read(device)
    except torch.OutOfMemoryError:
        if device.type == "cpu":
            raise
        # The GPU path needs about two of the largest weights free (a few hundred MB for Flux).
        log.warning("LowVRAM Kit: not enough free memory on %s to quantize there; quantizing on the CPU instead "
                    "(slower, same result)", device)
        comfy.model_management.soft_empty_cache()
        return read(torch.device("cpu"))


def quantizer_peak_bytes(path: str, prefix: str) -> int:
    """An upper bound of the device memory quantizing `path` takes at once: two weights in flight, each
    its high-precision source and its fp8 result, plus the row blocks' fp32 temporaries."""
    with open_safetensors(path) as f:
        header = read_header(f, path, prefix)
    largest = 0
    for name, shape in header.shapes.items():
        dtype = header.dtype(name)
        if dtype is not None and dtype.is_floating_point and dtype.itemsize >= 2 and len(shape) >= 2:
            largest = max(largest, math.prod(shape) * dtype.itemsize)
    return 2 * (largest + largest // 2) + QUANTIZER_SLACK_BYTES


def _quantize_file(path: str, cfg: QuantConfig, keep, prefix: str):
    def read(device):
        # Reserved while it runs: the text encoder may be planning its memory at the same time (see
        # _device_reservations and float8_dit_loader's worker thread).
        nbytes = quantizer_peak_bytes(path, prefix) if device.type == "cuda" else 0
        with reserve(device, nbytes):
            return quantize_file(path, cfg, keep, prefix=prefix, device=device, progress=LoadProgress())
    return quantize_on_device(read)


def post_load_adapter(family: Family):
    """The family's completion module (model_families.Family.post_load), e.g. NewBie's pooled path; or None."""
    return importlib.import_module(f".{family.post_load}", __package__) if family.post_load else None


@dataclass(frozen=True)
class Fp8Source:
    """What read_fp8_file hands build_fp8_model: the file read and quantized, no ComfyUI model yet."""

    path: str
    cfg: Fp8LoadConfig
    family: Family
    qf: object          # quant.QuantizedFile
    quant_cfg: QuantConfig
    saved: str | None
    started: float      # perf_counter() when the load began
    reused_copy: str | None = None


def read_fp8_file(path: str, cfg: Fp8LoadConfig) -> Fp8Source:
    """The part of a load that touches no ComfyUI state (header, quantization, the saved copy): safe to run
    in a worker thread while the prompt's other nodes run. Raises quant.QuantFileError / ValueError."""
    t0 = time.perf_counter()
    if cfg.save_copy_to and saved_source(cfg.save_copy_to) == copy_source(path, cfg):
        # save_quantized_copy on, and the copy was made from this very file with these settings: load it
        # (Flux-dev on an H200: 0.13 s instead of 1.17 s, bench/results/float8_flux_*T1017) instead of quantizing.
        source = read_fp8_file(cfg.save_copy_to, dataclasses.replace(cfg, save_copy_to=None))
        log.info("LowVRAM Kit Float8DiTLoader: %s is current for %s; loaded it instead of quantizing again",
                 cfg.save_copy_to, os.path.basename(path))
        return dataclasses.replace(source, reused_copy=cfg.save_copy_to, started=t0)
    family, prefix = inspect_file(path)
    patterns = parse_layer_patterns(cfg.high_precision_layers, family)
    qf = _quantize_file(path, cfg.quant, keep_filter(patterns), prefix)
    # A saved copy fixes how its weights were quantized (format, granularity); how to compute with them is
    # still the user's choice on this machine.
    quant_cfg = cfg.quant if qf.file_config is None else dataclasses.replace(
        qf.file_config, compute=cfg.quant.compute, act_scaling=cfg.quant.act_scaling)
    saved = None
    if cfg.save_copy_to and qf.layout != "lowvram":
        save_quantized(qf.state_dict, cfg.save_copy_to, quant_cfg, copy_source(path, cfg))
        saved = cfg.save_copy_to
    return Fp8Source(path, cfg, family, qf, quant_cfg, saved, t0)


def build_fp8_model(source: Fp8Source):
    """Return (ModelPatcher, Fp8LoadReport): ComfyUI builds the model from the read file (on the thread
    that runs the prompt's nodes)."""
    family, qf, quant_cfg, path = source.family, source.qf, source.quant_cfg, source.path
    device = comfy.model_management.get_torch_device()
    compute = resolve_compute(quant_cfg.compute, device)
    high_precision = HIGH_PRECISION_DTYPE.get(family.name, torch.bfloat16)
    # Cast-free operations where ComfyUI would pick them too: the high-precision weights are already in the
    # dtype the model computes in. A norm or kept Linear then skips cast_bias_weight, host time on every call
    # of every step.
    cast = comfy.model_management.unet_manual_cast(high_precision, device) is not None
    ops = make_fp8_ops(compute, quant_cfg.act_scaling, cast_weights=cast, fast_accum=source.cfg.fast_accum)
    options = {"custom_operations": ops, "dtype": high_precision}
    counts = (len(qf.quantized), len(qf.fp8_source), len(qf.kept))
    adapter = post_load_adapter(family)
    extra = adapter.take_extra_weights(qf.state_dict, family.name, path) if adapter else None
    model = comfy.sd.load_diffusion_model_state_dict(qf.state_dict, model_options=options)
    if model is None:
        raise ValueError(f"ComfyUI could not build a model from {os.path.basename(path)} (family {family.name}); "
                         "the file's keys did not match any model ComfyUI knows")
    if adapter:
        model = adapter.attach(model, extra, family.name, path)
    add_fused_ffn_patches(model)
    report = Fp8LoadReport(family.name, qf.layout, compute, *counts, time.perf_counter() - source.started,
                           source.saved, source.reused_copy, source.cfg.fast_accum)
    log.info("LowVRAM Kit Float8DiTLoader: %s", report.text())
    return model, report


def load_fp8_model(path: str, cfg: Fp8LoadConfig):
    """Return (ModelPatcher, Fp8LoadReport) in one call. Raises quant.QuantFileError / ValueError with clear text."""
    return build_fp8_model(read_fp8_file(path, cfg))
