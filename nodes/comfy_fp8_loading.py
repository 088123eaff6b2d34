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
from .comfy_fp8_ops import make_fp8_ops
from .model_families import Family, detect_family, keep_filter, parse_layer_patterns

T = TypeVar("T")

log = logging.getLogger("lowvram")
CHECKPOINT_PREFIX = "model.diffusion_model."
# Dtype of the layers that stay in high precision, per family (what the families were trained in).
HIGH_PRECISION_DTYPE = {"sdxl": torch.float16}


@dataclass(frozen=True)
class Fp8LoadConfig:
    quant: QuantConfig
    high_precision_layers: str = "auto"
    save_copy_to: str | None = None  # path of the quantized copy to write, or None


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

    def text(self) -> str:
        return (f"{self.family}: {self.quantized_layers} layers quantized, {self.fp8_source_layers} fp8 from the "
                f"file, {self.kept_layers} kept in high precision; compute {self.compute}; "
                f"source layout {self.layout}; {self.seconds:.1f} s"
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
    return detect_family(shapes), prefix


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


def _quantize_file(path: str, cfg: QuantConfig, keep, prefix: str):
    return quantize_on_device(lambda device: quantize_file(path, cfg, keep, prefix=prefix, device=device,
                                                           progress=LoadProgress()))


def post_load_adapter(family: Family):
    """The family's completion module (model_families.Family.post_load), e.g. NewBie's pooled path; or None."""
    return importlib.import_module(f".{family.post_load}", __package__) if family.post_load else None


def load_fp8_model(path: str, cfg: Fp8LoadConfig):
    """Return (ModelPatcher, Fp8LoadReport). Raises quant.QuantFileError / ValueError with clear text."""
    t0 = time.perf_counter()
    if cfg.save_copy_to and saved_source(cfg.save_copy_to) == copy_source(path, cfg):
        # save_quantized_copy on, and the copy was made from this very file with these settings: load it
        # (Flux-dev on an H200: 0.13 s instead of 1.17 s, bench/results/float8_flux_*T1017) instead of quantizing.
        model, report = load_fp8_model(cfg.save_copy_to, dataclasses.replace(cfg, save_copy_to=None))
        log.info("LowVRAM Kit Float8DiTLoader: %s is current for %s; loaded it instead of quantizing again",
                 cfg.save_copy_to, os.path.basename(path))   # the copy's own load logged its report
        return model, dataclasses.replace(report, reused_copy=cfg.save_copy_to, seconds=time.perf_counter() - t0)
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
    device = comfy.model_management.get_torch_device()
    compute = resolve_compute(quant_cfg.compute, device)
    high_precision = HIGH_PRECISION_DTYPE.get(family.name, torch.bfloat16)
    # Cast-free operations where ComfyUI would pick them too: the high-precision weights are already in the
    # dtype the model computes in. A norm or kept Linear then skips cast_bias_weight, host time on every call
    # of every step.
    cast = comfy.model_management.unet_manual_cast(high_precision, device) is not None
    ops = make_fp8_ops(compute, quant_cfg.act_scaling, cast_weights=cast)
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
    report = Fp8LoadReport(family.name, qf.layout, compute, *counts, time.perf_counter() - t0, saved)
    log.info("LowVRAM Kit Float8DiTLoader: %s", report.text())
    return model, report
