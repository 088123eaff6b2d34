"""ComfyUI adapter: stream a diffusion model's blocks with offload/ while ComfyUI manages everything else.

How the two never manage the same weights, using ComfyUI's own patcher mechanisms only:
- Object patches (`ModelPatcher.add_object_patch`, applied by ComfyUI while the model is patched in and
  restored when it is unpatched) replace each block list of the clone's diffusion model with a
  `HiddenBlocks` container that iterates like the original list but registers no submodules. ComfyUI's
  loader walks registered modules only, so it loads, pins, LoRA-patches and accounts for the rest of the
  model (embedders, final layer) and never sees a block weight.
- An APPLY_MODEL wrapper attaches the block streamer (offload.offload_blocks) on the first call after a
  load, on the device of the input, within the budget: resident groups go to the GPU once, the rest are
  packed into pinned host buffers and prefetched on a side stream by forward hooks on the blocks. It adds
  the streamer's device bytes to the model's loaded-weight count, so ComfyUI frees and plans knowing them.
- LoRA and other weight patches of block weights are applied the way ComfyUI applies them to its own
  offloaded layers: a `LowVramPatch` weight function per patched weight, run on the GPU copy per call.
- An ON_DETACH callback (ComfyUI unloading the model) and any exception during sampling (a cancelled
  prompt, an OOM) detach the streamer: device slots, pinned buffers and hooks are released.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
from comfy.patcher_extension import CallbacksMP, WrappersMP

from ..offload import OffloadConfig, offload_blocks
from ..offload.api import plan_for
from ..offload.packing import block_nbytes
from .model_families import family_of_model

log = logging.getLogger("lowvram")
KEY = "lowvram_block_streaming"
GiB = 1 << 30


class HiddenBlocks(torch.nn.Module):
    """Iterates, indexes and counts like the ModuleList (or Sequential) it stands for, registering nothing."""

    def __init__(self, items):
        super().__init__()
        object.__setattr__(self, "items", list(items))

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@dataclass(frozen=True)
class StreamingSettings:
    budget_bytes: int  # 0 = free device memory at attach time minus the activation estimate and margin
    chunk_size: int
    prefetch: int
    pin_memory: bool


class BlockStreamingSession:
    """Owns one streamer for one cloned ModelPatcher; attach lazily, detach on unload or error."""

    def __init__(self, patcher, settings: StreamingSettings):
        self.patcher, self.settings = patcher, settings
        self.family = family_of_model(patcher.model.diffusion_model)
        dm = patcher.model.diffusion_model
        self.lists = {name: getattr(dm, name) for name in self.family.block_lists}
        self.blocks = [b for name in self.family.block_lists for b in self.family.stream_units(self.lists[name])]
        self.streamer = None
        self.attached_for = None  # the patcher (this clone or a later one, e.g. with LoRA) now running
        self.plan_text = ""

    def install(self) -> None:
        for name, container in self.lists.items():
            self.patcher.add_object_patch(f"diffusion_model.{name}", HiddenBlocks(container))
        self.patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, self.apply_model_wrapper)
        self.patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, self.outer_sample_wrapper)
        self.patcher.add_callback_with_key(CallbacksMP.ON_DETACH, KEY, self.on_detach)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def budget_bytes(self, device) -> int:
        if self.settings.budget_bytes:
            return self.settings.budget_bytes
        # auto: what is free now, ComfyUI having loaded the rest of this model. Memory other models would
        # give back if unloaded is not counted (they may be needed again); the planner subtracts the
        # activation estimate and its margin.
        return comfy.model_management.get_free_memory(device)

    def attach(self, patcher, device, x_shape, seconds_per_block=None) -> None:
        activation_bytes = int(patcher.model.memory_required(list(x_shape)))
        config = OffloadConfig(budget_bytes=max(1, self.budget_bytes(device)),
                               chunk_size=self.settings.chunk_size, prefetch=self.settings.prefetch,
                               pin_memory=self.settings.pin_memory)
        self.config, self.activation_bytes = config, activation_bytes
        self.apply_weight_patches(patcher.patches)
        self.streamer = offload_blocks(self.blocks, config, device, activation_bytes=activation_bytes,
                                       seconds_per_block=seconds_per_block)
        patcher.model.model_loaded_weight_memory += self.streamer.device_bytes
        self.attached_for = weakref.ref(patcher)
        self.plan_text = self.streamer.plan.describe()
        log.info("LowVRAM Kit ChunkedOffloadUNet (%s): %s", self.family.name, self.plan_text)

    def detach(self, why: str) -> None:
        if self.streamer is None:
            return
        streamer, self.streamer, self.attached_for = self.streamer, None, None
        model = self.patcher.model
        model.model_loaded_weight_memory = max(0, model.model_loaded_weight_memory - streamer.device_bytes)
        streamer.detach()
        for m in self.block_modules():
            if hasattr(m, "weight_function"):
                m.weight_function, m.bias_function = [], []
        log.info("LowVRAM Kit ChunkedOffloadUNet: streaming released (%s)", why)

    def on_detach(self, patcher, *_):
        # Clones share this session; only the patcher the streamer serves may release it (another clone
        # being unloaded or garbage-collected must not pull the blocks from under a running one).
        if self.attached_for is not None and self.attached_for() in (patcher, None):
            self.detach("model unloaded")

    def block_modules(self):
        for block in self.blocks:
            yield from block.modules()

    def apply_weight_patches(self, patches: dict) -> None:
        """LoRA (and other) patches on block weights, applied per call as ComfyUI does for offloaded layers."""
        prefix_of = {id(b): p for p, b in self.named_blocks()}
        for block in self.blocks:
            for name, m in block.named_modules():
                if not hasattr(m, "weight_function"):
                    continue
                base = f"{prefix_of[id(block)]}{'.' + name if name else ''}"
                m.weight_function, m.bias_function = [], []
                for attr, funcs in (("weight", m.weight_function), ("bias", m.bias_function)):
                    key = f"{base}.{attr}"
                    if key in patches:
                        convert = getattr(m, "convert_weight", None) if attr == "weight" else None
                        setter = getattr(m, "set_weight", None) if attr == "weight" else None
                        funcs.append(comfy.model_patcher.LowVramPatch(key, patches, convert, setter))

    def named_blocks(self):
        """(state-dict prefix, block) for every streamed unit, e.g. 'diffusion_model.double_blocks.3'."""
        for list_name, container in self.lists.items():
            for i, unit in self.family.named_stream_units(container):
                yield f"diffusion_model.{list_name}.{i}", unit

    # ---- wrappers ------------------------------------------------------------------------------------
    def apply_model_wrapper(self, executor, x, *args, **kwargs):
        if self.streamer is not None:
            return executor(x, *args, **kwargs)
        # The patcher running now may be a later clone of ours (a LoRA loader after this node): its
        # patches are the ones to apply. ComfyUI sets BaseModel.current_patcher before sampling.
        patcher = getattr(executor.class_obj, "current_patcher", None) or self.patcher
        self.attach(patcher, x.device, x.shape)
        if x.device.type != "cuda":
            return executor(x, *args, **kwargs)
        # First step after a load: time every block's compute, then plan again knowing it. Without
        # compute times the planner assumes transfers dominate and keeps a resident prefix; with them it
        # can spread resident blocks so that copies keep flowing while they compute.
        with BlockTimer(self.blocks) as timer:
            out = executor(x, *args, **kwargs)
        self.replan(patcher, x, timer.seconds())
        return out

    def replan(self, patcher, x, seconds_per_block) -> None:
        if seconds_per_block is None or self.streamer is None:
            return
        old = self.streamer.plan
        new = plan_for(self.config, block_nbytes(self.blocks), self.activation_bytes, seconds_per_block)
        if (new.groups, new.resident, new.prefetch) == (old.groups, old.resident, old.prefetch):
            return
        self.detach("re-planning with measured compute times")
        self.attach(patcher, x.device, x.shape, seconds_per_block=seconds_per_block)

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        except BaseException:
            # A cancel or an error may stop mid-step with a group in flight: release everything; the
            # next prompt attaches again from a clean state.
            self.detach("sampling stopped by an error or a cancel")
            raise


class BlockTimer:
    """CUDA events around each block's compute for one pass. Registered after the streamer's hooks, so a
    block's start event is queued after its wait for the copy: the times are compute only."""

    def __init__(self, blocks):
        self.blocks, self.handles, self.events = blocks, [], []

    def __enter__(self):
        for block in self.blocks:
            pair = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]
            self.events.append(pair)
            self.handles.append(block.register_forward_pre_hook(lambda m, a, p=pair: p[0].record()))
            self.handles.append(block.register_forward_hook(lambda m, a, o, p=pair: p[1].record()))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def seconds(self) -> list[float] | None:
        """Per-block seconds, or None if a block did not run in the pass (nothing to re-plan with)."""
        torch.cuda.synchronize()
        try:
            return [start.elapsed_time(end) / 1000.0 for start, end in self.events]
        except RuntimeError:  # an event never recorded: that block was not called
            return None


def stream_blocks(model, settings: StreamingSettings):
    """A clone of `model` whose blocks stream within the budget; raises UnknownFamilyError for others."""
    clone = model.clone()
    session = BlockStreamingSession(clone, settings)
    session.install()
    clone.attachments[KEY] = session  # VRAMGuard reads the plan here; clones share the session
    return clone, session
