"""ComfyUI adapter: stream a diffusion model's blocks with offload/ while ComfyUI manages everything else.

How the two never manage the same weights, using ComfyUI's own patcher mechanisms only:
- Object patches (`ModelPatcher.add_object_patch`, applied by ComfyUI while the model is patched in and
  restored when it is unpatched) replace each block list of the clone's diffusion model with a
  `HiddenBlocks` container that iterates like the original list but registers no submodules. ComfyUI's
  loader walks registered modules only, so it loads, pins, LoRA-patches and accounts for the rest of the
  model (embedders, final layer) and never sees a block weight.
- An APPLY_MODEL wrapper attaches the block streamer (offload.offload_blocks) on the first call after a
  load, on the device of the input, within the budget (the first time for a latent shape, it times the
  blocks in the second call, the first one being warm-up, and plans again with the times; later loads,
  after a server restart too, plan with the times kept in <user folder>/lowvram_kit/block_times.json at
  once). The timed call also reads the device memory its activations took (StepMemory: allocator slack
  included), and later plans reserve that, +10%, instead of ComfyUI's estimate (compiled blocks need less,
  some eager ones more); it is kept in the same file. Resident groups go to the GPU once, the rest are
  packed into pinned host buffers and prefetched on a side stream by forward hooks on the blocks. It adds
  the streamer's device bytes to the model's loaded-weight count, so ComfyUI frees and plans knowing them.
- LoRA and other weight patches of block weights are computed with the math of ComfyUI's whole-model
  load (_weight_patches): merged once into the device copy of resident blocks when the streamer puts
  them there, and per call (a weight function, as ComfyUI does for its own offloaded layers) for
  streamed blocks, whose host copy stays unpatched.
- A PREPARE_SAMPLING wrapper (ComfyUI loading the model, before the first step) refuses a budget below
  the floor (largest transfer group x slots + activations + margin, offload.floor: the planner's own
  numbers) for the latent shape and batch of this sampling (x2 when CFG runs the negative): an explicit
  budget before anything loads, auto (free VRAM) once ComfyUI has loaded the rest of the model.
- CompileModelBlocks before or after this node: its request rides on the patcher (an attachment); the
  session compiles each block's class `forward` while attached (nodes._compiled_forwards), so the hooks
  that stream stay eager around the compiled graphs, and removes them on detach.
- A DIFFUSION_MODEL wrapper replays each model call from a CUDA graph while every block is resident and
  nothing else would differ between capture and replay (_graph_calls, offload.cuda_graphs): the host no longer
  issues each kernel of a step. The graphs are dropped after each sampling and whenever the streamer detaches.
- An ON_DETACH callback (ComfyUI unloading the model) and any exception during sampling (a refusal, a
  cancelled prompt, an OOM) detach the streamer: device slots, pinned pages and hooks are released. On an
  unload the packed host buffers (the blocks' host weights, unpinned) wait in PARKED_HOSTS, so the next
  load re-pins them instead of packing again; the re-plan after the timed step keeps them pinned.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
import weakref
from dataclasses import dataclass, field, replace

import torch

from comfy.patcher_extension import CallbacksMP, WrappersMP

from ..offload import DEFAULT_MARGIN_BYTES, BudgetTooSmall, Floor, OffloadConfig, floor, offload_blocks
from ..offload.api import plan_for
from ..offload.config import fmt_bytes
from ..offload.packing import block_nbytes
from . import _compiled_forwards as compiled_forwards
from . import _vram_registry as guard
from ._block_times import BlockTimes, times_key
from ._device_reservations import free_memory
from ._graph_calls import SessionGraphs
from ._vram_comfy import uses_cfg
from ._weight_patches import (BlockPatch, clear_weight_functions, find_block_patches, resident_patches,
                             set_streamed_patches)
from .model_families import family_of_model

log = logging.getLogger("lowvram")
KEY = "lowvram_block_streaming"
COMPILE_KEY = "torch.compile"   # the APPLY_MODEL wrapper key of ComfyUI's torch.compile helper
# Model calls after an attach that run untimed before the blocks are timed: the first pays one-time costs.
WARMUP_CALLS = 1
# The measured device memory of a step's activations (with the allocator's slack) is planned with this much
# on top: a re-plan changes slot sizes, and with them how the caching allocator's segments fit.
MEASURED_ACTIVATION_SAFETY = 1.10
# With activations measured, the margin only covers what a step cannot show (the CUDA context or cuBLAS
# workspaces growing later): the allocator's slack is inside the measurement. Flux on the H200 (T2005) peaked
# 0.25-0.39 GiB under its budgets with the full DEFAULT_MARGIN_BYTES kept out of measured plans, while its
# 4 GiB row streamed every byte that margin kept off the device (about 2 ms per step per 100 MiB).
MEASURED_MARGIN_BYTES = 64 << 20
# An automatic budget that grew by more than this since the last attach for a latent shape is planned anew
# (more resident blocks are worth packing again); a smaller growth keeps the last plan (see auto_budget).
KEEP_PLAN_GROWTH = 1.25
# ComfyUI batches cond and uncond into one model call only while this many times its activation estimate for
# the batch is free (comfy/samplers.py, _calc_cond_batch); see batching_activation_bytes.
COMFY_BATCH_FREE_FACTOR = 1.5
GiB = 1 << 30
WIDGET_STEP_GIB = 0.25  # vram_budget_gb's step: a suggested budget is rounded up to it


def activation_bytes(base_model, shape) -> int:
    """ComfyUI's estimate of activations for one model call on latents of `shape` (B, C, H, W): what the
    planner reserves next to the blocks, at the first step (attach) and in the check before sampling."""
    return int(base_model.memory_required(list(shape)))


# The packed (unpinned) host buffers of an unloaded streamed model, keyed by its first block, for whichever
# session attaches those blocks next; an attach takes them, so at most one set per block list waits here.
PARKED_HOSTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


class HiddenBlocks(torch.nn.Module):
    """Iterates, indexes and counts like the ModuleList (or Sequential) it stands for, registering nothing.

    It also answers ComfyUI's attribute paths by index ("diffusion_model.double_blocks.3"), reading and
    writing: it stays on the shared model after its clone is detached (see model_block_list), and another
    clone's TorchCompileModel or CompileModelBlocks then looks its blocks up, and swaps compiled ones in for
    a call (comfy.utils.get_attr / set_attr), through it. A swap replaces the item without registering it."""

    def __init__(self, container):
        super().__init__()
        object.__setattr__(self, "items", list(container))
        object.__setattr__(self, "original", container)  # the model's own list (see model_block_list)

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def __getattr__(self, name):
        if name.isdigit() and int(name) < len(self.items):
            return self.items[int(name)]
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name.isdigit() and int(name) < len(self.items):
            self.items[int(name)] = value
            return
        super().__setattr__(name, value)


def model_block_list(patcher, path: str):
    """The model's own block list at attribute path `path` ("diffusion_model.input_blocks",
    "t5xxl.transformer.encoder.block"), never one of our stand-ins.

    ComfyUI applies object patches to the model that all clones share and, when it loads another clone of
    it, detaches the old one without unpatching (load_models_gpu: detach(unpatch_all=False)). So once a
    streamed clone has run, `diffusion_model.input_blocks` is that clone's HiddenBlocks until the model is
    unloaded; a session built from it for the next clone (the next budget of a benchmark, a changed widget)
    must see through it. get_model_object gives the value before this patcher's patches (ComfyUI's backup
    of it while patched); a HiddenBlocks there (the input is a streamed clone) is unwrapped."""
    container = patcher.get_model_object(path)
    while isinstance(container, HiddenBlocks):
        container = container.original
    return container


@dataclass(frozen=True)
class StreamingSettings:
    budget_bytes: int  # 0 = free device memory at attach time minus the activation estimate and margin
    chunk_size: int
    prefetch: int
    pin_memory: bool
    cuda_graphs: bool = True  # replay model calls from CUDA graphs while every block is resident (_graph_calls)


class BlockStreamingSession:
    """Owns one streamer for one cloned ModelPatcher; attach lazily, detach on unload or error."""

    def __init__(self, patcher, settings: StreamingSettings):
        self.patcher, self.settings = patcher, settings
        self.family = family_of_model(patcher.model.diffusion_model)
        self.lists = {name: model_block_list(patcher, f"diffusion_model.{name}") for name in self.family.block_lists}
        self.blocks = [b for name in self.family.block_lists for b in self.family.stream_units(self.lists[name])]
        self.streamer = None
        self.attached_for = None  # the patcher (this clone or a later one, e.g. with LoRA) now running
        self.plan_text = ""
        self.cfg_doubles = False  # set by OUTER_SAMPLE for the sampling in progress: CFG runs the negative too
        self.batching_room = None  # activation bytes the plan tries to leave free so that cond and uncond batch
        self.calls = CallCounts()  # the model calls of the sampling in progress, by latents per call
        # Per (device, latent shape of one model call): each block's compute seconds, measured in the first
        # step after the first load. A later load (after ComfyUI unloaded the model) plans with them at once
        # instead of timing a step and packing and pinning everything a second time.
        self.block_seconds: dict[tuple[str, tuple[int, ...]], list[float]] = {}
        self.times_store = BlockTimes(block_times_path())   # the same, across server starts
        self.timed_devices = ("cuda",)  # where CUDA events can time blocks (tests add "cpu" with fake events)
        self.timing = None  # PendingTiming after an attach without known block times
        self.new_event = None  # BlockTimer's event factory; None = torch.cuda.Event
        # Per shape key: the device bytes a timed step's activations took (allocator slack included), which
        # replaces ComfyUI's estimate in later plans; and how a step's memory is read (tests: on the CPU).
        self.activation_measured: dict[tuple, int | None] = {}
        self.memory_probe = StepMemory.for_device
        # Per (device, latent shape): the budget the last attach planned with. See auto_budget.
        self.ran_budgets: dict[tuple, int] = {}
        self.graphs = SessionGraphs(self, settings.cuda_graphs)

    @functools.cached_property
    def block_bytes(self) -> list[int]:
        """Packed bytes per unit, measured once when first needed (fixed for the session's blocks)."""
        return block_nbytes(self.blocks)

    def install(self) -> None:
        for name, container in self.lists.items():
            self.patcher.add_object_patch(f"diffusion_model.{name}", HiddenBlocks(container))
        self.patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, self.apply_model_wrapper)
        self.patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, self.outer_sample_wrapper)
        self.patcher.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, KEY, self.prepare_sampling_wrapper)
        self.patcher.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, self.graphs.wrapper)
        self.patcher.add_callback_with_key(CallbacksMP.ON_DETACH, KEY, self.on_detach)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def budget_bytes(self, device) -> int:
        if self.settings.budget_bytes:
            return self.settings.budget_bytes
        # auto: what is free now, ComfyUI having loaded the rest of this model. Memory other models would
        # give back if unloaded is not counted (they may be needed again); the planner subtracts the
        # activation estimate and its margin. A streamer still attached from an earlier prompt holds
        # device memory that a new plan would get back, so it counts as free.
        held = self.streamer.device_bytes if self.streamer is not None else 0
        return self.free_bytes(device) + held

    def auto_budget(self, device, x_shape) -> int:
        """The budget of an attach for calls of `x_shape`: the settings' or, on auto, what is free, but no more
        than the last attach for this shape planned with unless that much grew by over KEEP_PLAN_GROWTH.

        Why: the same budget gives the same plan, so the packed host buffers parked when ComfyUI unloaded the
        model fit it as they are. Flux 8 GB's repeat prompt found 15% more free than the first (the text
        encoder gone) and planned again with it: 1.96 s of packing and pinning, then an out-of-memory retry
        when that plan left 22 MB of the 8 GiB (bench/results/workflows_e2e_*T0342)."""
        budget = max(1, self.budget_bytes(device))
        key = (str(torch.device(device)), tuple(int(d) for d in x_shape))
        ran = self.ran_budgets.get(key)
        if not self.settings.budget_bytes and ran is not None and budget <= ran * KEEP_PLAN_GROWTH:
            budget = min(budget, ran)
        self.ran_budgets[key] = budget
        return budget

    @staticmethod
    def free_bytes(device) -> int:
        return free_memory(device)

    def attach(self, patcher, device, x_shape, seconds_per_block=None, adopt_hosts=None,
               measured_activation_bytes=None) -> None:
        estimate = activation_bytes(patcher.model, x_shape)
        act = planned_activation_bytes(estimate, measured_activation_bytes)
        # Room for ComfyUI to batch cond and uncond, only where this call carries both: a first call with one of
        # them (made before any block took device memory) means their conditionings do not concatenate.
        batching = batching_activation_bytes(estimate) if self.calls.carries_both(x_shape[0]) else None
        config = OffloadConfig(budget_bytes=self.auto_budget(device, x_shape),
                               chunk_size=self.settings.chunk_size, prefetch=self.settings.prefetch,
                               pin_memory=self.settings.pin_memory,
                               margin_bytes=planned_margin_bytes(measured_activation_bytes))
        self.config, self.activation_bytes, self.estimated_activation_bytes = config, act, estimate
        self.batching_room = batching
        patches = self.block_patches(patcher.patches)
        resident = resident_patches(patches)
        if adopt_hosts is None:   # what the last streamer of these blocks left when the model was unloaded
            adopt_hosts = PARKED_HOSTS.pop(self.blocks[0], None)
        t0 = time.perf_counter()
        self.streamer = offload_blocks(self.blocks, config, device, activation_bytes=act,
                                       seconds_per_block=seconds_per_block, resident_values=resident or None,
                                       adopt_hosts=adopt_hosts, preferred_activation_bytes=batching)
        self.apply_streamed_patches(patches)
        request = self.compile_request(patcher)
        if request is not None:
            compiled_forwards.install(self.blocks, request)
        patcher.model.model_loaded_weight_memory += self.streamer.device_bytes
        self.attached_for = weakref.ref(patcher)
        self.plan_text = self.streamer.plan.describe()
        seconds = time.perf_counter() - t0
        log.info("LowVRAM Kit ChunkedOffloadUNet (%s): %s (attached in %.2f s)", self.family.name, self.plan_text,
                 seconds)
        # The guard's report shows what each attach cost (packing, pinning, copies to the device, LoRA merge).
        guard.timing("streaming attached", seconds, with_block_times=seconds_per_block is not None,
                     adopted_groups=self.streamer.adopted_groups,
                     resident_bytes=self.streamer.resident_device_bytes, pinned_bytes=self.streamer.pinned_host_bytes,
                     merged_patches=len(resident.by_tensor),
                     per_call_patches=sum(not self.streamer.is_resident(p.block) for p in patches))

    def detach(self, why: str, keep_hosts: bool = False, unpin_kept: bool = False):
        """Release the streamer; keep_hosts returns its host buffers for the next attach (pinned for a
        re-plan, unpinned with unpin_kept)."""
        if self.streamer is None:
            return None
        self.graphs.release()   # they read the weights where this streamer put them
        streamer, self.streamer, self.attached_for, self.timing = self.streamer, None, None, None
        model = self.patcher.model
        model.model_loaded_weight_memory = max(0, model.model_loaded_weight_memory - streamer.device_bytes)
        t0 = time.perf_counter()
        compiled_forwards.remove(self.blocks)
        hosts = streamer.detach(keep_hosts=keep_hosts, unpin_kept=unpin_kept)
        self.clear_weight_patches()
        seconds = time.perf_counter() - t0
        log.info("LowVRAM Kit ChunkedOffloadUNet: streaming released (%s) in %.2f s", why, seconds)
        guard.timing("streaming released", seconds, why=why)
        return hosts

    def on_detach(self, patcher, *_):
        # Clones share this session; only the patcher the streamer serves may release it (another clone
        # being unloaded or garbage-collected must not pull the blocks from under a running one).
        if self.attached_for is not None and self.attached_for() in (patcher, None):
            self.park("model unloaded")

    def park(self, why: str) -> None:
        """Release the streamer, keeping its packed host buffers for the next attach of these blocks: unpinned
        (nothing page-locked stays behind), but the packing is not redone (they are the blocks' host
        weights anyway; the next attach only re-pins them)."""
        hosts = self.detach(why, keep_hosts=True, unpin_kept=True)
        if hosts:
            PARKED_HOSTS[self.blocks[0]] = hosts

    def activation_to_plan(self, patcher, device, shape) -> int:
        """The activation bytes the next plan for model calls of `shape` on `device` reserves: the measured
        ones (+10%) when a timed step of this model, GPU, shape and compile state read them, else ComfyUI's
        estimate. VRAMGuard and the floor check use it, so that they count what the planner will."""
        return planned_activation_bytes(activation_bytes(patcher.model, list(shape)),
                                        self.measured_activation(patcher, device, shape))

    def margin_to_plan(self, patcher, device, shape) -> int:
        """The margin the next plan for model calls of `shape` on `device` keeps out (see planned_margin_bytes)."""
        return planned_margin_bytes(self.measured_activation(patcher, device, shape))

    def measured_activation(self, patcher, device, shape) -> int | None:
        """What a timed step of this model, GPU, shape and compile state measured (None: not measured)."""
        device = torch.device(device)
        key = (str(device), tuple(int(d) for d in shape), self.compile_request(patcher) is not None)
        if key not in self.activation_measured and device.type in self.timed_devices:
            self.activation_measured[key] = self.times_store.get_activation(
                self.times_key_for(device, key[1], key[2]))
        return self.activation_measured.get(key)

    @staticmethod
    def compile_request(patcher):
        """CompileModelBlocks' request on the patcher running now (None: the blocks run eager)."""
        return getattr(patcher, "attachments", {}).get(compiled_forwards.COMPILE_ATTACHMENT)

    def clear_weight_patches(self) -> None:
        clear_weight_functions(self.block_modules())

    def block_modules(self):
        for block in self.blocks:
            yield from block.modules()

    def block_patches(self, patches: dict) -> list[BlockPatch]:
        """Every patched weight and bias of the blocks, with the patch that gives its values."""
        return find_block_patches(self.named_blocks(), patches)

    def apply_streamed_patches(self, patches: list[BlockPatch]) -> None:
        """Per-call patches for the blocks that stream; resident ones got theirs merged in at attach."""
        set_streamed_patches(patches, self.streamer.is_resident, self.block_modules())

    def named_blocks(self):
        """(state-dict prefix, block) for every streamed unit, e.g. 'diffusion_model.double_blocks.3'."""
        for list_name, container in self.lists.items():
            for i, unit in self.family.named_stream_units(container):
                yield f"diffusion_model.{list_name}.{i}", unit

    # ---- wrappers ------------------------------------------------------------------------------------
    def apply_model_wrapper(self, executor, x, *args, **kwargs):
        # The patcher running now may be a later clone of ours (a LoRA loader or CompileModelBlocks after this
        # node): its patches and compile request are the ones to apply. ComfyUI sets BaseModel.current_patcher
        # before sampling.
        running = getattr(executor.class_obj, "current_patcher", None) or self.patcher
        self.calls.add(x.shape[0])
        compiled = self.compile_request(running) is not None
        shape_key = (str(x.device), tuple(x.shape), compiled)
        if self.streamer is None:
            patcher = running
            timed_here = x.device.type in self.timed_devices
            known = self.block_seconds.get(shape_key)
            if known is None and timed_here:
                key = self.times_key(x, compiled)
                known = self.block_seconds[shape_key] = self.times_store.get(key)
                self.activation_measured[shape_key] = self.times_store.get_activation(key)
            measured = self.activation_measured.get(shape_key)
            self.attach(patcher, x.device, x.shape, seconds_per_block=known, measured_activation_bytes=measured)
            # A step is timed (and its memory read) when either is not known yet for this shape on this GPU.
            untimed = known is None or (measured is None and self.memory_probe(x.device) is not None)
            self.timing = PendingTiming(shape_key, patcher) if timed_here and untimed else None
        timing = self.timing
        if timing is None or timing.shape_key != shape_key:
            return executor(x, *args, **kwargs)
        if timing.warmup_calls_left > 0:
            # The first calls after a load pay one-time costs inside the blocks (Triton and cuBLAS kernels
            # compiled and loaded, workspaces made): timed, they made compute look 16x slower than it is
            # and the planner then kept too few blocks resident (Flux 8 GB on the H200: 0.19 s/it, not 0.16).
            timing.warmup_calls_left -= 1
            return executor(x, *args, **kwargs)
        self.timing = None
        patcher = timing.patcher
        # Time every block's compute in a warm call, then plan again knowing it. Without compute times
        # the planner assumes transfers dominate and keeps a resident prefix; with them it can spread
        # resident blocks so that copies keep flowing while they compute.
        t0 = time.perf_counter()
        probe = self.memory_probe(x.device)
        with BlockTimer(self.blocks, self.new_event) as timer, (probe or contextlib.nullcontext()):
            out = executor(x, *args, **kwargs)
        seconds = timer.seconds()
        measured = probe.activation_bytes if probe is not None else None
        guard.timing("a warm step, blocks timed", time.perf_counter() - t0,
                     blocks_compute_s=None if seconds is None else round(sum(seconds), 4),
                     activation_gib_measured=None if measured is None else round(measured / GiB, 3),
                     activation_gib_estimated=round(self.estimated_activation_bytes / GiB, 3))
        if seconds is not None:
            self.block_seconds[shape_key] = seconds
            self.activation_measured[shape_key] = measured
            self.times_store.put(self.times_key(x, compiled), seconds, activation_bytes=measured)
        self.replan(patcher, x, seconds, measured)
        return out

    def times_key(self, x, compiled: bool = False) -> str:
        return self.times_key_for(x.device, tuple(x.shape), compiled)

    def times_key_for(self, device, shape, compiled: bool = False) -> str:
        """This model's blocks, this GPU and this latent shape, as the block-time file names them; compiled
        blocks compute faster than eager ones, so their times are kept apart."""
        device = torch.device(device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        family = self.family.name + ("+compiled" if compiled else "")
        return times_key(family, self.block_bytes, name, tuple(shape))

    def replan(self, patcher, x, seconds_per_block, measured_activation_bytes=None) -> None:
        if seconds_per_block is None or self.streamer is None:
            return
        old = self.streamer.plan
        act = planned_activation_bytes(self.estimated_activation_bytes, measured_activation_bytes)
        config = replace(self.config, margin_bytes=planned_margin_bytes(measured_activation_bytes))
        try:
            new = plan_for(config, self.block_bytes, act, seconds_per_block,
                           preferred_activation_bytes=self.batching_room)
        except BudgetTooSmall:
            # The step took more than ComfyUI's estimate and no plan fits the budget with it. This sampling
            # already runs (its steps so far fitted), so it goes on with the current plan; the next one is
            # checked against the measurement before it starts.
            log.warning("LowVRAM Kit ChunkedOffloadUNet: a step's activations took %s, more than the budget "
                        "leaves room for with any plan; keeping the current plan for this sampling",
                        fmt_bytes(measured_activation_bytes or 0))
            return
        if (new.groups, new.resident, new.prefetch) == (old.groups, old.resident, old.prefetch):
            return
        # The groups that stay streamed keep their packed, pinned host buffers: only what changed is redone.
        hosts = self.detach("re-planning with measured compute times", keep_hosts=True)
        if x.device.type == "cuda":
            # The timed step's activations sit in the caching allocator's free segments; the new resident
            # arena is a different size, so give them back first rather than allocate beside them.
            torch.cuda.empty_cache()
        self.attach(patcher, x.device, x.shape, seconds_per_block=seconds_per_block, adopt_hosts=hosts,
                    measured_activation_bytes=measured_activation_bytes)

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        guider = executor.class_obj  # CFGGuider (or a subclass): its cfg says whether the negative runs
        self.cfg_doubles = uses_cfg(guider, getattr(guider, "conds", {}) or {})
        noise = args[0] if args else kwargs.get("noise")
        self.calls = CallCounts(noise.shape[0] if isinstance(noise, torch.Tensor) else None, self.cfg_doubles)
        try:
            out = executor(*args, **kwargs)
        except BaseException:
            # A refusal, a cancel or an error (which may stop mid-step with a group in flight): release
            # everything; the next prompt attaches again from a clean state.
            self.detach("sampling stopped by an error or a cancel")
            raise
        finally:
            self.cfg_doubles = False
            self.graphs.report()   # and drop them: the VAE decodes next, and the weights may move
        self.calls.report()
        return out

    def prepare_sampling_wrapper(self, executor, patcher, noise_shape, *args, **kwargs):
        """ComfyUI loads the model here, before any step: refuse a budget below the floor now, not at step 1."""
        if self.settings.budget_bytes:  # explicit: known before anything loads
            self.check_floor(patcher, noise_shape, self.settings.budget_bytes)
            return executor(patcher, noise_shape, *args, **kwargs)
        out = executor(patcher, noise_shape, *args, **kwargs)
        # auto: what is free once ComfyUI has loaded the rest of the model, as attach will see it
        self.check_floor(patcher, noise_shape, self.budget_bytes(patcher.load_device))
        return out

    def floor_for(self, patcher, noise_shape) -> tuple[Floor, list[int]]:
        """The planner's floor for one model call of this sampling, and that call's latent shape.

        ComfyUI runs cond and uncond as one batch (_calc_cond_batch) when CFG runs the negative, so a
        call sees 2 x the latent batch: [2B, C, H, W]; the first step's plan is made for that shape."""
        shape = [noise_shape[0] * (2 if self.cfg_doubles else 1), *noise_shape[1:]]
        s = self.settings
        device = patcher.load_device
        low = floor(self.block_bytes, self.activation_to_plan(patcher, device, shape), chunk_size=s.chunk_size,
                    prefetch=s.prefetch, margin_bytes=self.margin_to_plan(patcher, device, shape))
        return low, shape

    def check_floor(self, patcher, noise_shape, budget_bytes: int) -> None:
        low, shape = self.floor_for(patcher, noise_shape)
        if budget_bytes < low.budget_bytes:
            raise BudgetTooSmall(self.below_floor_message(patcher, budget_bytes, low, shape),
                                 smallest_budget_bytes=low.budget_bytes)

    def below_floor_message(self, patcher, budget_bytes: int, low: Floor, shape) -> str:
        s = self.settings
        model_class = type(patcher.model.diffusion_model).__name__
        suggested_gib = math.ceil(low.budget_bytes / GiB / WIDGET_STEP_GIB) * WIDGET_STEP_GIB
        source = "vram_budget_gb" if s.budget_bytes else "auto: the VRAM free after ComfyUI loaded the rest of the model"
        batch = f"{shape[0]} latent(s) per model call" + (", doubled by CFG" if self.cfg_doubles else "")
        fixes = [f"set vram_budget_gb to {suggested_gib:g} or more" if s.budget_bytes else
                 f"free {fmt_bytes(low.budget_bytes - budget_bytes)} more VRAM (unload other models, close other "
                 f"programs), or use a GPU with more free memory"]
        without_activations = low.budget_bytes - low.activation_bytes
        note = ""
        if budget_bytes > without_activations:
            fixes.append(f"lower the resolution or batch size so that activations fit in "
                         f"{fmt_bytes(budget_bytes - without_activations)} (now {fmt_bytes(low.activation_bytes)}"
                         + ("; cfg 1.0 would halve them" if self.cfg_doubles else "") + ")")
        else:
            note = (f" A lower resolution or batch cannot help: the blocks alone need {fmt_bytes(without_activations)}"
                    " (resident blocks + transfer slots + margin).")
        if s.chunk_size or s.prefetch:
            fixes.append("set chunk_size and prefetch to 0 (auto) for smaller transfer slots")
        return (
            f"LowVRAM Kit ChunkedOffloadUNet ({self.family.name}, {model_class}): the VRAM budget "
            f"{fmt_bytes(budget_bytes)} ({source}) is below the smallest budget that runs this model for latents "
            f"{list(shape)} ({batch}): {low.describe()}. Nothing was run. The smallest budget that works is "
            f"{low.budget_bytes} bytes ({low.budget_bytes / GiB:.2f} GiB); to run, {'; or '.join(fixes)}.{note}"
        )


def planned_activation_bytes(estimated: int, measured: int | None) -> int:
    """What a plan reserves for activations: the measured bytes of a warm step with MEASURED_ACTIVATION_SAFETY
    on top once known (smaller than ComfyUI's estimate for compiled blocks, larger for some eager ones), else
    ComfyUI's estimate (BaseModel.memory_required)."""
    return estimated if measured is None else int(measured * MEASURED_ACTIVATION_SAFETY)


def batching_activation_bytes(estimated: int) -> int:
    """Room for activations that lets ComfyUI run cond and uncond as one model call: it batches them only
    while get_free_memory() exceeds COMFY_BATCH_FREE_FACTOR x its estimate for the batch
    (samplers._calc_cond_batch), and otherwise runs them one after the other, each call with half the work: a
    plan leaving only the measured activations free (+10%) would leave less than that whenever ComfyUI's
    estimate is within 1.36x of the measurement. Checked on the CPU against ComfyUI's own batching
    (tests/integration/test_block_streaming_floor.py); not measured on a GPU: NewBie's cond and uncond never
    batch (prompts of different token counts), and no other streamed row ran CFG with this since."""
    return int(estimated * COMFY_BATCH_FREE_FACTOR)


def planned_margin_bytes(measured: int | None) -> int:
    """What a plan keeps out of its budget besides activations: MEASURED_MARGIN_BYTES once the activations were
    measured, else DEFAULT_MARGIN_BYTES (it also covers the allocator's slack that an estimate leaves out)."""
    return DEFAULT_MARGIN_BYTES if measured is None else MEASURED_MARGIN_BYTES


class StepMemory:
    """Device bytes one model call needs beyond what is allocated when it starts: activations plus the caching
    allocator's slack, i.e. what NVML sees it add. The cache is emptied first, so reserved memory at the end
    (it only grows within a call) minus allocated memory at the start is the call's own footprint."""

    def __init__(self, device):
        self.device, self.start, self.activation_bytes = device, 0, None

    @classmethod
    def for_device(cls, device):
        """A probe where the device has a caching allocator to read (CUDA), else None."""
        return cls(device) if torch.device(device).type == "cuda" else None

    def __enter__(self):
        torch.cuda.empty_cache()
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.activation_bytes = max(0, torch.cuda.memory_reserved(self.device) - self.start)


@dataclass
class CallCounts:
    """How many model calls of a sampling ran with how many latents: with CFG, ComfyUI batches cond and uncond
    into one call (2 x the batch) while it finds enough VRAM free, else it runs them one after the other, which
    costs most of a second call's time; the report says which happened."""

    batch: int | None = None          # latents in the sampled batch (None: not known)
    cfg_doubles: bool = False
    by_latents: dict = field(default_factory=dict)   # latents per call -> calls
    first_latents: int | None = None  # of the sampling's first call

    def add(self, latents: int) -> None:
        if self.first_latents is None:
            self.first_latents = int(latents)
        self.by_latents[int(latents)] = self.by_latents.get(int(latents), 0) + 1

    def carries_both(self, latents: int) -> bool:
        """Whether a call of `latents` runs cond and uncond of the whole batch together."""
        return self.cfg_doubles and self.batch is not None and latents >= 2 * self.batch

    @property
    def split(self) -> int:
        """Calls that ran cond or uncond alone (CFG on, fewer latents than cond + uncond of the batch)."""
        if not self.cfg_doubles or self.batch is None:
            return 0
        return sum(n for latents, n in self.by_latents.items() if not self.carries_both(latents))

    def report(self) -> None:
        if not self.by_latents:
            return
        total, split = sum(self.by_latents.values()), self.split
        latents = dict(sorted(self.by_latents.items()))
        # The first call comes before the blocks hold any device memory: split there, ComfyUI found the two
        # conditionings not concatenable (e.g. prompts of different token counts), whatever the budget.
        never = split and not self.carries_both(self.first_latents)
        guard.note({"kind": "model calls", "calls": total, "latents_per_call": latents,
                    "cond_uncond_split_calls": split,
                    "split_because": "conditionings" if never else "memory" if split else None})
        if split and not never:
            log.warning("LowVRAM Kit ChunkedOffloadUNet: ComfyUI ran cond and uncond as separate model calls in %d "
                        "of %d calls: it batches them only while %.1fx its activation estimate is free, and the "
                        "budget left less (a larger vram_budget_gb, or fewer other models on the GPU, gives it room)",
                        split, total, COMFY_BATCH_FREE_FACTOR)
        elif never:
            log.info("LowVRAM Kit ChunkedOffloadUNet: %d model calls, latents per call %s: ComfyUI runs cond and "
                     "uncond apart, their conditionings having shapes it does not concatenate", total, latents)
        else:
            log.info("LowVRAM Kit ChunkedOffloadUNet: %d model calls, latents per call %s", total, latents)


@dataclass
class PendingTiming:
    """Blocks of this call shape still to be timed: after WARMUP_CALLS untimed calls, the next one."""

    shape_key: tuple
    patcher: object
    warmup_calls_left: int = WARMUP_CALLS


def block_times_path() -> str | None:
    """<ComfyUI user folder>/lowvram_kit/block_times.json (None where ComfyUI has no user folder)."""
    try:
        import folder_paths
    except ImportError:
        return None
    return os.path.join(folder_paths.get_user_directory(), "lowvram_kit", "block_times.json")


class BlockTimer:
    """CUDA events around each block's compute for one pass. Registered after the streamer's hooks, so a
    block's start event is queued after its wait for the copy: the times are compute only.

    Which events were recorded is tracked here: asking CUDA for the time of an unrecorded event raises
    (RuntimeError or ValueError, depending on the torch version), and a block whose hooks did not fire
    (not called in this pass, or called without its own __call__) must mean "no measurement", not an error."""

    def __init__(self, blocks, new_event=None):
        self.blocks, self.handles, self.events = blocks, [], []
        self.new_event = new_event or functools.partial(torch.cuda.Event, enable_timing=True)
        self.recorded: list[list[bool]] = []  # per block: [start recorded, end recorded]

    def __enter__(self):
        for i, block in enumerate(self.blocks):
            pair = (self.new_event(), self.new_event())
            self.events.append(pair)
            self.recorded.append([False, False])
            self.handles.append(block.register_forward_pre_hook(functools.partial(self._mark, i, 0)))
            self.handles.append(block.register_forward_hook(functools.partial(self._mark, i, 1)))
        return self

    def _mark(self, i: int, which: int, *_hook_args) -> None:
        self.events[i][which].record()
        self.recorded[i][which] = True

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def seconds(self) -> list[float] | None:
        """Per-block seconds, or None if a block did not run in the pass (nothing to re-plan with)."""
        missing = [i for i, (start, end) in enumerate(self.recorded) if not (start and end)]
        if missing:
            log.warning("LowVRAM Kit ChunkedOffloadUNet: %d of %d blocks were not timed in the timed step "
                        "(first: block %d, %s); keeping the plan made without compute times",
                        len(missing), len(self.blocks), missing[0], type(self.blocks[missing[0]]).__name__)
            return None
        for _, end in self.events:
            end.synchronize()
        return [start.elapsed_time(end) / 1000.0 for start, end in self.events]


def has_apply_model_wrapper(patcher, key: str) -> bool:
    """Whether a ModelPatcher (or a stand-in without wrappers) has APPLY_MODEL wrappers under `key`."""
    return bool(getattr(patcher, "wrappers", {}).get(WrappersMP.APPLY_MODEL, {}).get(key))


def stream_blocks(model, settings: StreamingSettings):
    """A clone of `model` whose blocks stream within the budget; raises UnknownFamilyError for others.

    A model compiled by CompileModelBlocks keeps being compiled: ComfyUI's module-swapping wrapper is taken off
    the clone and the session compiles each block's forward at attach instead (nodes._compiled_forwards)."""
    compile_request = getattr(model, "attachments", {}).get(compiled_forwards.COMPILE_ATTACHMENT)
    if has_apply_model_wrapper(model, COMPILE_KEY) and compile_request is None:
        raise ValueError(
            "ChunkedOffloadUNet: this model is compiled as a whole (ComfyUI's TorchCompileModel), and the compiled "
            "model would bypass the hooks that stream its blocks. Use CompileModelBlocks instead (before or after "
            "this node): it compiles block by block, which streaming supports.")
    clone = model.clone()
    if compile_request is not None:
        clone.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY)
    session = BlockStreamingSession(clone, settings)
    session.install()
    clone.attachments[KEY] = session  # VRAMGuard reads the plan here; clones share the session
    return clone, session
