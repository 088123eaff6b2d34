"""What the pack knows about each model family, in one table: how to recognise its state dict, which
layers stay in high precision under fp8, and where its blocks live (in the order a step runs them).

Pure data plus two lookups; no ComfyUI import, so the table is tested on its own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

from torch import nn


def _shape0(sd: Mapping, key: str):
    t = sd.get(key)
    return None if t is None else tuple(t.shape)[0]


@dataclass(frozen=True)
class Family:
    name: str
    matches: Callable[[Mapping], bool]  # state dict (keys without prefix) -> is this family
    # Layer-name patterns (regex, full match on the name without ".weight") kept in bf16 by "auto".
    keep_high_precision: tuple[str, ...]
    # Attributes of the diffusion model holding its block lists, in the order one step runs them.
    block_lists: tuple[str, ...]
    why: str
    model_classes: tuple[str, ...] = ()  # class names of the ComfyUI diffusion model
    # SDXL's blocks are TimestepEmbedSequential containers whose children ComfyUI calls one by one
    # (forward_timestep_embed: their own forward never runs, so hooks on them never fire): the streamed
    # units are the children.
    units_are_children: bool = False
    # Module in nodes/ that completes a model after ComfyUI built it (take_extra_weights + attach), or "".
    post_load: str = ""
    # Whether one call of the diffusion model may be captured whole in a CUDA graph (ChunkedOffloadUNet's
    # cuda_graphs): its forward makes no host syncs and reads nothing per call but its arguments. Checked on a
    # GPU for Next-DiT (NewBie) on ComfyUI 0.3.75; each call is still probed before a capture.
    graph_capturable: bool = False

    def named_stream_units(self, container) -> list[tuple[str, nn.Module]]:
        """(index path, module) of the units that stream, in call order, for one block list.

        With `units_are_children`, an item that is a Sequential (input_blocks.i / output_blocks.i) is
        replaced by its children ("i.j"); other items (middle_block's ResBlock, SpatialTransformer) are
        units ("j"). Decided per item, not by the container's class: the container may be a stand-in
        that only iterates (the adapter's HiddenBlocks, left on the shared model by an earlier clone),
        and taking its Sequentials as units would stream modules whose hooks never fire."""
        if not self.units_are_children:
            return [(str(i), b) for i, b in enumerate(container)]
        units: list[tuple[str, nn.Module]] = []
        for i, item in enumerate(container):
            if isinstance(item, nn.Sequential):
                units.extend((f"{i}.{j}", child) for j, child in enumerate(item))
            else:
                units.append((str(i), item))
        return units

    def stream_units(self, container) -> list[nn.Module]:
        return [unit for _, unit in self.named_stream_units(container)]


# Flux: the embedders and the final layer stay bf16 (0.3% of the weights). Its modulation layers are 18% of
# the weights (19 x 2 x [18432, 3072] + 38 x [9216, 3072]) and run on one token per step, so they are
# quantized: kept in bf16 they would push resident fp8 Flux-dev from 11.1 to 13.1 GiB.
FLUX_KEEP = (r"img_in", r"txt_in", r"time_in\..*", r"vector_in\..*", r"guidance_in\..*", r"final_layer\..*")
# Next-DiT (Lumina-2, NewBie, Z-Image): embedders, adaLN modulation (one vector per step), the final layer
# and NewBie's pooled-text path stay bf16 (about 10% of NewBie's weights).
NEXTDIT_KEEP = (r"x_embedder", r"t_embedder\..*", r"cap_embedder\..*", r".*adaLN_modulation\..*",
                r"final_layer\..*", r"clip_text_pooled_proj\..*", r"time_text_embed\..*")
# SDXL: only the transformer blocks' linear layers are quantized (the option the issue names); the
# time/label embeddings and the 1x1 projections stay fp16.
SDXL_KEEP = (r"time_embed\..*", r"label_emb\..*", r".*\.proj_in", r".*\.proj_out", r"out\..*")

NEXTDIT_BLOCKS = ("context_refiner", "noise_refiner", "layers")

FAMILIES = (
    Family("flux", lambda sd: "double_blocks.0.img_attn.norm.key_norm.scale" in sd, FLUX_KEEP,
           ("double_blocks", "single_blocks"), "Flux.1 (dev, schnell, finetunes)", ("Flux",)),
    # Next-DiT runs context_refiner, then noise_refiner, then layers (comfy/ldm/lumina/model.py).
    Family("z-image", lambda sd: _shape0(sd, "cap_embedder.1.weight") == 3840, NEXTDIT_KEEP,
           NEXTDIT_BLOCKS, "Z-Image (Next-DiT, dim 3840)"),
    Family("newbie", lambda sd: "cap_embedder.1.weight" in sd and "clip_text_pooled_proj.0.weight" in sd,
           NEXTDIT_KEEP, NEXTDIT_BLOCKS, "NewBie-image (Next-DiT + Jina path)", post_load="comfy_newbie_dit"),
    Family("lumina2", lambda sd: "cap_embedder.1.weight" in sd, NEXTDIT_KEEP,
           NEXTDIT_BLOCKS, "Next-DiT (Lumina-2, NewBie, Z-Image)", ("NextDiT",), post_load="comfy_newbie_dit",
           graph_capturable=True),
    Family("sdxl", lambda sd: "input_blocks.0.0.weight" in sd and "label_emb.0.0.weight" in sd, SDXL_KEEP,
           ("input_blocks", "middle_block", "output_blocks"), "SDXL UNet", ("UNetModel",), units_are_children=True),
)
WHAT_WE_LOOK_FOR = ("double_blocks.0.img_attn.norm.key_norm.scale (Flux), cap_embedder.1.weight (Next-DiT: "
                    "Lumina-2, NewBie, Z-Image), input_blocks.0.0.weight + label_emb.0.0.weight (SDXL)")


class UnknownFamilyError(ValueError):
    pass


def detect_family(sd: Mapping) -> Family:
    """The first family whose predicate matches the (prefix-free) state dict keys/shapes.

    >>> detect_family({"double_blocks.0.img_attn.norm.key_norm.scale": None}).name
    'flux'
    """
    for fam in FAMILIES:
        if fam.matches(sd):
            return fam
    raise UnknownFamilyError(
        f"this file is not a diffusion model the pack knows: none of the keys it looks for were found "
        f"({WHAT_WE_LOOK_FOR}). Is it a text encoder, a VAE or a LoRA? Pick a diffusion model file.")


def family_of_model(diffusion_model) -> Family:
    """The family whose block table fits a built ComfyUI diffusion model (by class name)."""
    name = type(diffusion_model).__name__
    for fam in FAMILIES:
        if name in fam.model_classes:
            return fam
    known = ", ".join(f"{c} ({f.name})" for f in FAMILIES for c in f.model_classes)
    raise UnknownFamilyError(f"the pack does not know where {name} keeps its blocks; known model classes: {known}")


def keep_filter(patterns: tuple[str, ...]) -> Callable[[str, tuple], bool]:
    """A quant keep-filter: True for `<layer>.weight` keys whose layer name fully matches a pattern."""
    compiled = [re.compile(p) for p in patterns]

    def keep(weight_key: str, shape: tuple) -> bool:
        layer = weight_key[: -len(".weight")] if weight_key.endswith(".weight") else weight_key
        return any(c.fullmatch(layer) for c in compiled)
    return keep


def parse_layer_patterns(text: str, family: Family) -> tuple[str, ...]:
    """The node's `high_precision_layers` widget: "auto", or comma-separated regexes (may start with
    "auto," to extend the family default). Raises ValueError naming the bad pattern."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("high_precision_layers is empty; write 'auto' or comma-separated layer-name patterns")
    out: list[str] = []
    for p in parts:
        if p == "auto":
            out.extend(family.keep_high_precision)
            continue
        if p == "none":
            continue
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"high_precision_layers: {p!r} is not a valid regular expression ({e})") from None
        out.append(p)
    return tuple(out)
