"""ComfyUI adapter: stream a text encoder's transformer blocks with offload/, so that evicting it copies nothing.

Why: ComfyUI loads a text encoder that does not fit the card partly onto the GPU, and when the diffusion
model needs that memory it moves those weights back into freshly allocated host memory. On the Flux 8 GB
workflow ComfyUI's loading of the DiT took 4.48 s of the first prompt (VRAMGuard's timing, H200, T0322), nearly
all of it that eviction of about 5.5 GB of T5-XXL (bench.stack_sampler: model_unload > detach > unpatch_model >
Module.to), more than the 20 steps. A streamed block keeps its host copy: evicting it frees device memory and
copies nothing back.

How, with ComfyUI's own patcher mechanisms on a clone of the CLIP's ModelPatcher (as ChunkedOffloadUNet):
- Object patches replace each transformer block list (T5Stack.block, Llama2_.layers, CLIPEncoder.layers:
  the stacks of STREAMED_STACKS) with HiddenBlocks, so ComfyUI loads, counts and evicts only the rest
  (embeddings and final norms: a few hundred MB). CLIP-L's layers joined the list when ComfyUI's copying
  back of what it had loaded was the largest part left of the eviction (0.54 s of the Flux 8 GB first
  prompt, bench/results/gpu_rounds_nvidia-h200_2026-11-22T0651.log).
- An ON_LOAD callback (ComfyUI has just loaded the rest onto the device) attaches the block streamer within
  the budget (0 = what is free then) and adds its device bytes to the model's loaded size, so ComfyUI's
  free_memory knows them. ComfyUI's load sets that size to what it loaded itself just before the callback, so
  a later load (partially_load, when more memory is free) gets the streamer's bytes added again. Resident groups are copied to the device; the others stream from pinned host
  buffers on a side stream.
- An ON_DETACH callback (ComfyUI evicting the encoder) releases the streamer: device memory freed, the
  packed host buffers unpinned and kept for the next load (nothing is packed twice).
- LoRA and other weight patches of block weights: merged into resident device copies at attach, per call
  for streamed blocks, with the math of ComfyUI's whole-model load (_weight_patches).
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

import torch

from comfy.patcher_extension import CallbacksMP

from ..offload import OffloadConfig, offload_blocks
from ._device_reservations import free_memory
from ._weight_patches import clear_weight_functions, find_block_patches, resident_patches, set_streamed_patches
from .comfy_block_streaming import PARKED_HOSTS, HiddenBlocks, model_block_list

log = logging.getLogger("lowvram")
KEY = "lowvram_text_encoder_streaming"
MiB = 1 << 20
# ComfyUI's transformer stacks whose block lists stream, by class name: attribute holding the blocks. All
# call each block through its __call__ (the streamer's hooks): T5Stack (T5-XXL of Flux and SD3, UMT5),
# Llama2_ (Qwen3-4B of Z-Image, Gemma of Lumina-2 and NewBie, Llama, Mistral) and CLIPEncoder (CLIP-L/G:
# small, but what ComfyUI loads itself it copies back on eviction; usually all resident in the plan).
STREAMED_STACKS = {"T5Stack": "block", "Llama2_": "layers", "CLIPEncoder": "layers"}
# Activations of one encode (T5-XXL, 512 tokens: [512, 10240] FFN in fp32 and 64 heads of 512x512 scores are
# tens of MB): planned next to the blocks, with the streamer's own margin on top.
ENCODE_ACTIVATION_BYTES = 256 * MiB


class NoStreamableBlocks(ValueError):
    """The CLIP has no transformer stack this adapter knows (STREAMED_STACKS)."""


@dataclass(frozen=True)
class TextEncoderStreamingSettings:
    budget_bytes: int  # 0 = what is free on the device when ComfyUI has loaded the rest of the encoder
    pin_memory: bool = True


def block_lists(patcher) -> dict[str, torch.nn.Module]:
    """{attribute path under the CLIP model: the stack's own block list} for every stack of STREAMED_STACKS.

    A clone of a streamed clone sees HiddenBlocks on the shared model (ComfyUI leaves object patches applied
    when it swaps clones); model_block_list sees through them."""
    found = {}
    for name, module in patcher.model.named_modules():
        attr = STREAMED_STACKS.get(type(module).__name__)
        if attr is not None:
            path = f"{name}.{attr}" if name else attr
            found[path] = model_block_list(patcher, path)
    return found


class TextEncoderStreamingSession:
    """One streamer for a cloned CLIP patcher (and its later clones): attach on load, park on eviction."""

    def __init__(self, patcher, settings: TextEncoderStreamingSettings):
        self.patcher, self.settings = patcher, settings
        self.lists = block_lists(patcher)
        if not self.lists:
            stacks = sorted({type(m).__name__ for m in patcher.model.children()})
            raise NoStreamableBlocks(
                f"ChunkedOffloadTextEncoder: this text encoder ({type(patcher.model).__name__}: {', '.join(stacks)}) "
                f"has no block stack it streams (it streams {', '.join(STREAMED_STACKS)}: T5-XXL, Qwen3, Gemma, "
                "Llama, CLIP). Remove the node for this model; ComfyUI's own loading handles it.")
        self.blocks = [b for container in self.lists.values() for b in container]
        self.streamer = None
        self.attached_for = None
        self.attach_on_cpu = False   # tests: the CPU is the "device" (ComfyUI's load device without a GPU)

    def install(self) -> None:
        for path, container in self.lists.items():
            self.patcher.add_object_patch(path, HiddenBlocks(container))
        self.patcher.add_callback_with_key(CallbacksMP.ON_LOAD, KEY, self.on_load)
        self.patcher.add_callback_with_key(CallbacksMP.ON_DETACH, KEY, self.on_detach)

    def named_blocks(self):
        for path, container in self.lists.items():
            for i, block in enumerate(container):
                yield f"{path}.{i}", block

    def block_modules(self):
        for block in self.blocks:
            yield from block.modules()

    def budget_bytes(self, device) -> int:
        if self.settings.budget_bytes:
            return self.settings.budget_bytes
        return free_memory(device)   # less what a Float8DiTLoader quantizing beside it holds

    # ---- callbacks -----------------------------------------------------------------------------------
    def on_load(self, patcher, device_to, *_):
        device = torch.device(device_to) if device_to is not None else None
        if device is None or (device.type == "cpu" and not self.attach_on_cpu):
            return
        if self.streamer is not None:
            if self.attached_for() is patcher and self.streamer.device == device:
                # ComfyUI loaded more of the rest (partially_load) and counted only that: the blocks are in place.
                patcher.model.model_loaded_weight_memory += self.streamer.device_bytes
                return
            self.park("another clone of the text encoder loaded")
        self.attach(patcher, device)

    def on_detach(self, patcher, *_):
        # Only the patcher the streamer serves releases it (another clone being dropped must not).
        if self.streamer is not None and self.attached_for() in (patcher, None):
            self.park("text encoder unloaded")

    # ---- attach / release ----------------------------------------------------------------------------
    def attach(self, patcher, device) -> None:
        patches = find_block_patches(self.named_blocks(), patcher.patches)
        resident = resident_patches(patches)
        config = OffloadConfig(budget_bytes=max(1, self.budget_bytes(device)), pin_memory=self.settings.pin_memory)
        t0 = time.perf_counter()
        self.streamer = offload_blocks(self.blocks, config, device, activation_bytes=ENCODE_ACTIVATION_BYTES,
                                       resident_values=resident or None,
                                       adopt_hosts=PARKED_HOSTS.pop(self.blocks[0], None))
        set_streamed_patches(patches, self.streamer.is_resident, self.block_modules())
        patcher.model.model_loaded_weight_memory += self.streamer.device_bytes
        self.attached_for = weakref.ref(patcher)
        log.info("LowVRAM Kit ChunkedOffloadTextEncoder: %s (attached in %.2f s)", self.streamer.plan.describe(),
                 time.perf_counter() - t0)

    def park(self, why: str) -> None:
        """Release the streamer; its packed host buffers wait (unpinned) for the next load of these blocks."""
        streamer, self.streamer = self.streamer, None
        model = self.patcher.model
        model.model_loaded_weight_memory = max(0, model.model_loaded_weight_memory - streamer.device_bytes)
        t0 = time.perf_counter()
        hosts = streamer.detach(keep_hosts=True, unpin_kept=True)
        clear_weight_functions(self.block_modules())
        if hosts:
            PARKED_HOSTS[self.blocks[0]] = hosts
        log.info("LowVRAM Kit ChunkedOffloadTextEncoder: streaming released (%s) in %.2f s", why,
                 time.perf_counter() - t0)


def stream_text_encoder(clip, settings: TextEncoderStreamingSettings):
    """A clone of `clip` whose transformer blocks stream; raises NoStreamableBlocks for other encoders."""
    clone = clip.clone()
    for call in (CallbacksMP.ON_LOAD, CallbacksMP.ON_DETACH):   # the node applied twice: the later one streams
        clone.patcher.remove_callbacks_with_key(call, KEY)
    session = TextEncoderStreamingSession(clone.patcher, settings)
    session.install()
    clone.patcher.attachments[KEY] = session
    return clone, session
