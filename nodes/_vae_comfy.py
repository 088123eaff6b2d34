"""LazyVAEDecode's contact with ComfyUI: check the inputs, measure, load the VAE, decode by plan, unload.

The tile planning and blending live in _tiling.py (no ComfyUI there). Here:
- the working-set estimate is ComfyUI's own per-VAE `vae.memory_used_decode` (bytes for a latent shape
  and dtype), turned into bytes per output pixel;
- free memory is `comfy.model_management.get_free_memory(device)`, read before the VAE is loaded;
- the VAE is moved with `load_models_gpu([vae.patcher], memory_required=...)`, so ComfyUI only evicts
  what the planned working set needs, and moved back with `free_memory(..., keep_loaded=<all others>)`,
  which unloads this VAE and nothing else through ComfyUI's own bookkeeping;
- VRAMGuard, when a guarded prompt runs: the decode is its "decoding" stage, and its request (tiles of at
  most tile_px, at most max_bytes of the device) limits the plan unless tiling is "never".
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import _vram_registry as guard
from ._tiling import DecodeRequest, Hooks, TilePlan, TilingPolicy, allocator_limit, plan_decode, run_decode

log = logging.getLogger("lowvram")
REFERENCE_LATENT = 64   # latent side used to turn ComfyUI's estimate into bytes per output pixel


@dataclass(frozen=True)
class DecodeSettings:
    tiling: str = "auto"
    tile_size: int = 0
    overlap: int = 64
    offload_after_decode: bool = True


def check_inputs(vae, samples) -> torch.Tensor:
    """The latent tensor, or a ValueError that names what is wrong and how to fix it (nothing loaded yet)."""
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        raise ValueError("LazyVAEDecode: the VAE input holds no weights (a checkpoint without a VAE?); "
                         "load one with Load VAE")
    if not isinstance(samples, dict) or not isinstance(samples.get("samples"), torch.Tensor):
        raise ValueError("LazyVAEDecode: 'samples' must be a LATENT (a dict with a 'samples' tensor)")
    latent = samples["samples"]
    if latent.ndim != 4 or getattr(vae, "latent_dim", 2) != 2 or not isinstance(vae.upscale_ratio, int):
        raise ValueError(f"LazyVAEDecode decodes image latents [B, C, H, W] with a 2-D image VAE; got a "
                         f"{latent.ndim}-D latent {tuple(latent.shape)} and a "
                         f"{type(vae.first_stage_model).__name__} VAE. Use ComfyUI's VAE Decode for video/audio")
    if latent.shape[0] == 0:
        raise ValueError(f"LazyVAEDecode: the latent batch is empty (shape {tuple(latent.shape)}): "
                         "nothing to decode; check the node that made the latent")
    if latent.shape[1] != vae.latent_channels:
        raise ValueError(f"LazyVAEDecode: the latent has {latent.shape[1]} channels but this VAE takes "
                         f"{vae.latent_channels} (Flux, SD3, Z-Image and NewBie latents have 16, SDXL and "
                         "SD1.5 have 4): connect the VAE of the model that made the latent")
    return latent


def build_request(vae, latent: torch.Tensor, s: DecodeSettings, ask: guard.DecodeRequest | None = None
                  ) -> DecodeRequest:
    """What the planner needs; `ask` is VRAMGuard's request (None: no guarded prompt runs)."""
    import comfy.model_management as mm
    up = vae.upscale_ratio
    ref = (1, latent.shape[1], REFERENCE_LATENT, REFERENCE_LATENT)
    per_px = vae.memory_used_decode(ref, vae.vae_dtype) / (REFERENCE_LATENT * up) ** 2
    on_cpu = mm.is_device_cpu(vae.device)
    weights = 0 if on_cpu else max(0, vae.patcher.model_size() - vae.patcher.loaded_size())
    free = int(mm.get_free_memory(vae.device))
    if ask is not None and ask.max_bytes > 0:    # the guard's budget holds all VAE weights, loaded or not
        free = min(free, ask.max_bytes - (0 if on_cpu else vae.patcher.loaded_size()))
    return DecodeRequest(batch=latent.shape[0], latent_h=latent.shape[2], latent_w=latent.shape[3], upscale=up,
                         bytes_per_out_px=per_px, weight_bytes=weights,
                         free_bytes=max(0, free - image_bytes(vae, latent)),
                         mode=s.tiling, tile_px=s.tile_size, overlap_px=s.overlap,
                         max_tile_px=0 if ask is None else ask.tile_px)


def guard_answer(ask: guard.DecodeRequest | None, req: DecodeRequest, plan: TilePlan
                 ) -> tuple[int, str] | None:
    """The log level and line saying how this plan answers VRAMGuard's request for tiles (None: none made)."""
    if ask is None or ask.tile_px <= 0:
        return None
    if req.mode == "never":
        return logging.WARNING, (f"LowVRAM Kit: LazyVAEDecode decodes whole images (tiling=never) although "
                                 f"VRAMGuard asked for tiles of at most {ask.tile_px} px: "
                                 f"{ask.why.rstrip('. ')}. Set tiling to auto to follow it")
    if not plan.tiled:
        return logging.INFO, (f"LowVRAM Kit: LazyVAEDecode decodes whole images: they are no larger than the "
                              f"{ask.tile_px} px tiles VRAMGuard asked for")
    px = max(plan.tile_hw) * req.upscale
    return logging.INFO, f"LowVRAM Kit: LazyVAEDecode tiles at {px} px because VRAMGuard asked: {ask.why}"


def image_bytes(vae, latent: torch.Tensor) -> int:
    """The fp32 blend buffer [B, 3, H, W] that stays on the device during the decode."""
    b, _, h, w = latent.shape
    return b * getattr(vae, "output_channels", 3) * h * w * vae.upscale_ratio ** 2 * 4


def settable_fraction(value: float | None) -> float:
    """A memory fraction set_per_process_memory_fraction accepts (0 < f <= 1) for what the getter said.

    With no limit set, torch 2.11's getter answers the allocator's "no limit" size over the device's
    memory (about 1.2e8 on an H200), which the setter refuses: that means 1.0.
    >>> settable_fraction(122888273.8), settable_fraction(0.25), settable_fraction(None)
    (1.0, 0.25, 1.0)
    """
    return value if value is not None and 0 < value <= 1 else 1.0


@contextmanager
def allocator_cap(device: torch.device, limit_bytes: int | None):
    """Hold torch's CUDA caching allocator to `limit_bytes` in this block, then restore the old fraction.

    Why: cuDNN chooses convolution algorithms by the workspace it can get, so an uncapped decode takes
    whatever is free (ComfyUI's VAE Decode: 11.6 GiB of a 12 GiB budget for one 1024x1024 Flux image).
    A convolution whose workspace does not fit under the cap uses an algorithm that needs less.
    """
    if device.type != "cuda" or limit_bytes is None:
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    previous = settable_fraction(getter(device) if getter else None)
    torch.cuda.set_per_process_memory_fraction(min(previous, limit_bytes / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, device)


def unload_vae(vae) -> None:
    """Move this VAE's weights back to its offload device; every other loaded model stays."""
    import comfy.model_management as mm
    others = [m for m in mm.current_loaded_models if m.model is not vae.patcher]
    mm.free_memory(1e30, vae.device, keep_loaded=others)
    mm.soft_empty_cache()


def decode_lazily(vae, samples, s: DecodeSettings, policy: TilingPolicy = TilingPolicy()) -> tuple[torch.Tensor, TilePlan]:
    """IMAGE [B, H, W, C] in 0..1 on ComfyUI's intermediate device, and the plan that decoded it."""
    latent = check_inputs(vae, samples)
    with guard.stage("decoding"):          # the guard's report: this decode's peak and time (no-op unguarded)
        ask = guard.decode_request()
        req = build_request(vae, latent, s, ask)
        plan = plan_decode(req, policy)
        log.info("LazyVAEDecode: %s", plan.describe())
        answer = guard_answer(ask, req, plan)
        if answer is not None:
            log.log(*answer)
        guard.note({"kind": "decode", "tile_px": max(plan.tile_hw) * req.upscale if plan.tiled else 0,
                    "asked_tile_px": 0 if ask is None else ask.tile_px, "plan": plan.describe()})
        return _decode(vae, latent, s, req, plan, policy)


def _decode(vae, latent: torch.Tensor, s: DecodeSettings, req: DecodeRequest, plan: TilePlan,
            policy: TilingPolicy) -> tuple[torch.Tensor, TilePlan]:
    import comfy.model_management as mm
    import comfy.utils

    pbar = comfy.utils.ProgressBar(plan.calls(req.batch))

    def decode(chunk: torch.Tensor, where: str) -> torch.Tensor:   # [b, C, h, w] -> [b, 3, h*up, w*up]
        device = vae.device if where == "gpu" else torch.device("cpu")
        return vae.first_stage_model.decode(chunk.to(device, vae.vae_dtype))

    hooks = Hooks(decode=decode, on_oom=mm.soft_empty_cache, to_cpu=lambda: unload_vae(vae),
                  check_interrupt=mm.throw_exception_if_processing_interrupted,
                  progress=lambda done, total: pbar.update_absolute(done, total),
                  warn=log.warning, work_device=vae.device, cpu_allowed=not mm.is_device_cpu(vae.device))
    try:
        mm.load_models_gpu([vae.patcher], memory_required=plan.est_call_bytes,
                           force_full_load=getattr(vae, "disable_offload", False))
        reserved = torch.cuda.memory_reserved(vae.device) if vae.device.type == "cuda" else 0
        limit = allocator_limit(reserved, plan, image_bytes(vae, latent), policy)
        with torch.no_grad(), allocator_cap(vae.device, limit):
            raw, used = run_decode(latent, plan, req, hooks, policy)
        image = vae.process_output(raw).to(vae.output_device).movedim(1, -1)   # [B, H, W, C]
    finally:
        if s.offload_after_decode:
            unload_vae(vae)
    return image, used
