"""VRAMGuard's contact with ComfyUI: measure the job and the device, say where weights would sit for a
given cap, and apply a cap. The arithmetic lives in _vram_estimate.py and _vram_policy.py.

Where the diffusion weights sit, by case (`Placements.placement_for(cap, images_per_run)`):
- block-streamed (ChunkedOffloadUNet's session in `patcher.attachments["lowvram_block_streaming"]`): the
  offload planner's plan for the session's blocks at the budget that leaves `cap` for the weights, plus
  the weights ComfyUI loads itself (embedders, final layer). A cap re-plans the session (`apply_cap`).
- ComfyUI's own loading on a GPU: what `load_models_gpu` keeps resident for the free memory it will
  see (its rule, mirrored by _vram_estimate.comfy_partial_resident). A cap is applied the way the user
  would with `--reserve-vram`: while ComfyUI loads this model, its reserved VRAM is raised so that it
  keeps `cap` resident; the setting is restored right after (`reserve_vram`).
- on the CPU: no device memory; host RAM is compared instead.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import contextmanager

import torch

import comfy.model_management as mm

from ..offload import DEFAULT_MARGIN_BYTES, BudgetTooSmall, OffloadConfig, block_nbytes, floor, plan_for
from ._vram_estimate import Placement, Workload, comfy_partial_resident
from ._vram_monitor import MemoryReader
from ._vram_policy import Memory
from .model_families import UnknownFamilyError, family_of_model

log = logging.getLogger("lowvram")
STREAMING_KEY = "lowvram_block_streaming"
GiB = 1 << 30


def family_name(dm) -> str:
    """Estimator family of a built diffusion model; the class name for models the pack does not know."""
    try:
        fam = family_of_model(dm).name
    except UnknownFamilyError:
        return type(dm).__name__
    if fam == "lumina2":   # one ComfyUI class (NextDiT) for Lumina-2, NewBie and Z-Image
        if getattr(dm, "dim", 0) == 3840:
            return "z-image"
        if getattr(dm, "clip_text_pooled_proj", None) is not None:
            return "newbie"
    return fam


def weight_stats(patcher) -> tuple[int, int, int]:
    """(bytes, parameters, largest layer's parameters) of the diffusion model, streamed blocks included
    (while a streaming session is patched in, its blocks are hidden from the module tree)."""
    seen, nbytes, params, largest = set(), 0, 0, 0
    session = patcher.attachments.get(STREAMING_KEY)
    modules = [patcher.model.diffusion_model] + (list(session.blocks) if session is not None else [])
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            nbytes += t.numel() * t.element_size()
            params += t.numel()
            if t.ndim >= 2:
                largest = max(largest, t.numel())
    return nbytes, params, largest


def text_tokens(conds: dict) -> int:
    """Longest text conditioning [1, tokens, dim] among the conds (0 when none has one)."""
    n = 0
    for cs in (conds or {}).values():
        for c in cs or ():
            t = c.get("cross_attn") if isinstance(c, dict) else None
            if isinstance(t, torch.Tensor) and t.ndim == 3:
                n = max(n, t.shape[1])
    return n


def fp8_matmul(dm) -> bool:
    """ComfyUI's fp8 matmul operations (UNETLoader fp8_e4m3fn_fast, --fast fp8_matrix_mult) are in use."""
    for m in dm.modules():
        if isinstance(m, torch.nn.Linear):
            return "fp8_ops" in type(m).__qualname__ and bool(mm.supports_fp8_compute(None))
    return False


def compute_bytes(model) -> int:
    dtype = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
    return max(1, torch.empty((), dtype=dtype).element_size())


def uses_cfg(guider, conds: dict) -> bool:
    """ComfyUI runs the negative prompt only for cfg != 1 (unless told not to skip it)."""
    cfg = getattr(guider, "cfg", 1.0)
    if not isinstance(cfg, (int, float)) or "negative" not in (conds or {}):
        return False
    opts = getattr(guider, "model_options", {}) or {}
    return not math.isclose(cfg, 1.0) or bool(opts.get("disable_cfg1_optimization", False))


def read_memory(device) -> Memory:
    """Free device memory (NVML, every process counted; plus torch's cached-free, as ComfyUI counts it),
    what ComfyUI can unload on this device, and the card's total. Host RAM on the CPU."""
    reader = MemoryReader.open(device)
    try:
        if device.type != "cuda":
            return Memory(int(reader.free()), 0, int(reader.total), reader.source)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        held = sum(int(lm.model_loaded_memory()) for lm in mm.current_loaded_models if lm.device == device)
        return Memory(int(reader.free()) + max(0, cached), held, int(reader.total), reader.source, reader.note)
    finally:
        reader.close()


class Placements:
    """placement_for(cap) for one model and job; apply_cap / reserve_vram make the cap happen."""

    def __init__(self, patcher, noise_shape, images_per_call: int, card_bytes: int):
        self.patcher = patcher
        self.device = patcher.load_device
        self.session = patcher.attachments.get(STREAMING_KEY)
        self.card_bytes = card_bytes           # free + reclaimable: what ComfyUI would see for this prompt
        self.weight_bytes = weight_stats(patcher)[0]
        shape = [images_per_call] + list(noise_shape[1:])
        # The activations the streamer plans with: ComfyUI's own estimate (ComfyUI loads leaving it free), or
        # what a timed step of this model and shape measured (ChunkedOffloadUNet keeps it).
        planned = getattr(self.session, "activation_to_plan", None)   # (a stand-in session may have none)
        self.comfy_activation = (planned(patcher, self.device, shape) if planned is not None
                                 else int(patcher.model.memory_required(shape)))
        self.noise_shape = tuple(noise_shape)
        self.block_bytes = block_nbytes(self.session.blocks) if self.session is not None else []
        # The margin the streamer keeps out: smaller once that step's activations were measured.
        margin = getattr(self.session, "margin_to_plan", None)
        self.margin = margin(patcher, self.device, shape) if margin is not None else DEFAULT_MARGIN_BYTES
        self._plans: dict[tuple[int, int, int], object] = {}   # (budget, chunk, prefetch) -> Plan or refusal
        self.floor = self._streaming_floor() if self.session is not None else 0

    @property
    def kind(self) -> str:
        if self.session is not None:
            return "streamed"
        return "cpu" if self.device.type != "cuda" else "comfy"

    def placement_for(self, cap: int | None, images_per_run: int | None = None) -> Placement:
        """Where the weights sit with at most `cap` device bytes (None: as set up) when a sampling runs
        `images_per_run` latents (None: the whole batch). ComfyUI sizes its loading by the run's batch, so
        a batch split into runs of 1 may load a model whole that the full batch would load in part."""
        if self.session is not None:
            return self._streamed(cap)
        if self.device.type != "cuda":
            return Placement("cpu", 0)
        resident = comfy_partial_resident(self.card_bytes, self.weight_bytes, self.comfy_required(images=images_per_run),
                                          int(mm.minimum_inference_memory()), mm.MIN_WEIGHT_MEMORY_RATIO)
        if cap is not None:
            resident = min(resident, max(0, cap))
        kind = "full" if resident >= self.weight_bytes else "comfy_partial"
        return Placement(kind, resident, 0, 0)

    def comfy_minimum(self, images: int | None = None) -> int:
        """ComfyUI's activation estimate for one run of `images` latents (None: the whole batch): what
        prepare_sampling passes as the minimum when it loads the model (estimate_memory, batch not doubled)."""
        n = self.noise_shape[0] if images is None else images
        return int(self.patcher.model.memory_required([n] + list(self.noise_shape[1:])))

    def comfy_required(self, extra_reserved: int | None = None, images: int | None = None) -> int:
        """ComfyUI's minimum_memory_required when it loads this model (load_models_gpu): its activation
        estimate for the run or its minimum inference memory, whichever is larger, plus reserved VRAM."""
        extra = int(mm.extra_reserved_memory()) if extra_reserved is None else extra_reserved
        inference = int(mm.minimum_inference_memory()) - int(mm.extra_reserved_memory())
        return max(inference, self.comfy_minimum(images)) + extra

    # ---- block streaming ---------------------------------------------------------------------------
    def streaming_budget(self, cap: int | None) -> int:
        """The session budget that leaves `cap` device bytes for resident blocks + slots + other weights."""
        if cap is None:
            return self.session.settings.budget_bytes or max(1, self.card_bytes)
        return max(1, cap - self.non_block_bytes + self.comfy_activation + self.margin)

    @property
    def non_block_bytes(self) -> int:
        return max(0, self.weight_bytes - sum(self.block_bytes))

    def _streamed(self, cap: int | None) -> Placement:
        s = self.session.settings
        config = OffloadConfig(budget_bytes=self.streaming_budget(cap), chunk_size=s.chunk_size,
                               prefetch=s.prefetch, pin_memory=s.pin_memory, margin_bytes=self.margin)
        floor = self.floor
        streamer = self.session.streamer
        try:
            if cap is None and streamer is not None:   # attached: its plan is what will run
                plan = streamer.plan
            else:
                plan = self._plan(config)
        except BudgetTooSmall:
            return Placement("streamed", self.non_block_bytes, max(0, floor - self.non_block_bytes), floor)
        slots = plan.slot_count * plan.slot_bytes
        return Placement("streamed", self.non_block_bytes + plan.resident_bytes, slots, min(floor, self.non_block_bytes
                         + plan.resident_bytes + slots))

    def _plan(self, config: OffloadConfig):
        """The planner's plan for `config`, made once per budget: a decision asks for the same caps several
        times, and planning Flux's 57 blocks takes 50-150 ms of Python each time."""
        key = (config.budget_bytes, config.chunk_size, config.prefetch)
        if key not in self._plans:
            try:
                self._plans[key] = plan_for(config, self.block_bytes, self.comfy_activation)
            except BudgetTooSmall as e:
                self._plans[key] = e
        found = self._plans[key]
        if isinstance(found, BudgetTooSmall):
            raise found
        return found

    def _streaming_floor(self) -> int:
        # The planner's own floor (the budget below which plan() refuses), less what it counts besides blocks.
        s = self.session.settings
        f = floor(self.block_bytes, self.comfy_activation, chunk_size=s.chunk_size, prefetch=s.prefetch,
                  margin_bytes=self.margin)
        return self.non_block_bytes + f.budget_bytes - self.comfy_activation - self.margin

    def apply_cap(self, cap: int | None) -> dict | None:
        """Re-plan a streaming session for `cap`; returns what to restore after the prompt (or None)."""
        if self.session is None or cap is None:
            return None
        budget = self.streaming_budget(cap)
        old = self.session.settings
        self.session.settings = dataclasses.replace(old, budget_bytes=budget)
        streamer = self.session.streamer
        if streamer is not None and streamer.plan.budget_bytes != budget:
            self.session.park("VRAMGuard re-plans the resident set")
        return {"session": self.session, "settings": old}

    def reserve_for_cap(self, cap: int | None, images_per_run: int | None = None) -> int:
        """Extra reserved VRAM that makes ComfyUI keep `cap` bytes of this model resident (0: no change) in
        runs of `images_per_run` latents (None: the whole batch)."""
        if cap is None or self.session is not None or self.device.type != "cuda":
            return 0
        keep_free = self.card_bytes - cap            # ComfyUI keeps free: its minimum + its reserve
        return max(0, keep_free - self.comfy_required(images=images_per_run))


def restore(token: dict | None) -> None:
    if token is not None:
        token["session"].settings = token["settings"]


@contextmanager
def reserve_vram(extra_bytes: int):
    """ComfyUI's --reserve-vram raised by `extra_bytes` while a model loads, then restored."""
    if extra_bytes <= 0 or not hasattr(mm, "EXTRA_RESERVED_VRAM"):
        yield
        return
    old = mm.EXTRA_RESERVED_VRAM
    mm.EXTRA_RESERVED_VRAM = old + int(extra_bytes)
    try:
        yield
    finally:
        mm.EXTRA_RESERVED_VRAM = old


def workload(patcher, noise_shape, conds: dict, cfg_batch: int) -> Workload:
    """The estimator's view of one sampling call. 5-D (video) latents count frames x height as height."""
    model = patcher.model
    nbytes, params, largest = weight_stats(patcher)
    shape = list(noise_shape)
    h = math.prod(shape[2:-1]) if len(shape) >= 4 else 1
    return Workload(family=family_name(model.diffusion_model), batch=max(1, shape[0]), latent_h=max(1, h),
                    latent_w=max(1, shape[-1]), weight_bytes=nbytes, params=params,
                    text_tokens=text_tokens(conds), cfg_batch=cfg_batch, compute_bytes=compute_bytes(model),
                    storage_bytes=nbytes / max(1, params), largest_layer_params=largest,
                    fp8_matmul=fp8_matmul(model.diffusion_model))
