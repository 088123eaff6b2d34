"""The sampling workload of a benchmark and its inputs, per model family: random conditioning of the shapes
each family's text encoders give, plus the empty latent, fixed by the seed (CPU generator: the same on
every machine). The text encoders themselves are never run.

| family | latent C | text features             | pooled                                  | cfg (batch) |
|--------|----------|---------------------------|-----------------------------------------|-------------|
| flux   | 16       | T5-XXL [1, 256, 4096]     | CLIP-L [1, 768]; guidance 3.5           | 1 (1)       |
| newbie | 16       | Gemma-3-4B [1, 256, 2560] | Jina CLIP v2 [1, 1024]                  | 4.5 (2)     |
| sdxl   | 4        | CLIP-L+G [1, 77, 2048]    | CLIP-G [1, 1280] + sizes -> y [1, 2816] | 6 (2)       |
(latent [1, C, H/8, W/8])

NewBie's caption length is its prompt's (Gemma tokens of system prompt + caption, about 100-800); 256 is a
mid-size prompt. On ComfyUI 0.3.75 the pack's NewBie adapter turns "pooled_output" into the DiT's
`clip_text_pooled`; ComfyUI core's Lumina-2 ignores it (it drops the Jina path's weights at load).

    >>> w = workload_for("sdxl", width=64, height=64, steps=2)
    >>> w.cfg, w.txt_tokens, w.latent_shape
    (6.0, 77, (1, 4, 8, 8))
    >>> pos, neg, latent = make_inputs(w)
    >>> tuple(pos[0][0].shape), tuple(neg[0][1]["pooled_output"].shape), pos[0][1]["target_width"]
    ((1, 77, 2048), (1, 1280), 64)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class FamilyInputs:
    latent_channels: int
    txt_width: int          # features per text token
    pooled_width: int
    txt_tokens: int         # default sequence length
    cfg: float              # default CFG scale (> 1: the negative is computed, batch 2)
    extras: Callable[["Workload"], dict]   # more conditioning keys, read by the model's extra_conds


def _sdxl_sizes(w: "Workload") -> dict:
    # CLIPTextEncodeSDXL's size conditioning: what SDXL.encode_adm embeds next to the pooled vector.
    return {"width": w.width, "height": w.height, "crop_w": 0, "crop_h": 0,
            "target_width": w.width, "target_height": w.height}


FAMILY_INPUTS = {
    "flux": FamilyInputs(16, 4096, 768, 256, 1.0, lambda w: {"guidance": w.guidance}),
    "newbie": FamilyInputs(16, 2560, 1024, 256, 4.5, lambda w: {}),
    "sdxl": FamilyInputs(4, 2048, 1280, 77, 6.0, _sdxl_sizes),
}


@dataclass(frozen=True)
class Workload:
    width: int = 1024
    height: int = 1024
    steps: int = 5
    txt_tokens: int = 256           # T5 sequence length ComfyUI pads Flux prompts to
    guidance: float = 3.5           # FluxGuidance default (Flux only)
    cfg: float = 1.0                # Flux-dev is guidance-distilled: no negative pass
    sampler: str = "euler"
    scheduler: str = "simple"
    seed: int = 0
    family: str = "flux"

    def __post_init__(self):
        if self.family not in FAMILY_INPUTS:
            raise ValueError(f"Workload.family={self.family!r}: choose from {', '.join(FAMILY_INPUTS)}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v < 16 or v % 16:
                raise ValueError(f"Workload.{name}={v}: must be a multiple of 16 (8x VAE, 2x2 patches)")
        if self.steps < 2:
            raise ValueError(f"Workload.steps={self.steps}: need >= 2 (the first step is dropped)")
        if self.txt_tokens < 1:
            raise ValueError(f"Workload.txt_tokens={self.txt_tokens}: must be >= 1")

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        # what EmptySD3LatentImage (16 channels) / EmptyLatentImage (4) make
        return (1, FAMILY_INPUTS[self.family].latent_channels, self.height // 8, self.width // 8)


def workload_for(family: str, **fields) -> Workload:
    """The family's workload: its default text length and CFG unless `fields` give them."""
    spec = FAMILY_INPUTS.get(family)
    if spec is None:
        raise ValueError(f"unknown family {family!r}: choose from {', '.join(FAMILY_INPUTS)}")
    return Workload(family=family, **{"txt_tokens": spec.txt_tokens, "cfg": spec.cfg, **fields})


def make_inputs(w: Workload):
    """(positive, negative, latent). The negative is random where CFG computes it; at CFG 1 ComfyUI skips
    the negative pass, and zeros keep Flux's inputs what they always were."""
    spec = FAMILY_INPUTS[w.family]
    g = torch.Generator("cpu").manual_seed(w.seed)

    def draw():
        cond = torch.randn((1, w.txt_tokens, spec.txt_width), generator=g).to(torch.bfloat16)
        pooled = torch.randn((1, spec.pooled_width), generator=g).to(torch.bfloat16)
        return cond, pooled

    cond, pooled = draw()
    positive = [[cond, {"pooled_output": pooled, **spec.extras(w)}]]
    neg_cond, neg_pooled = draw() if w.cfg != 1.0 else (torch.zeros_like(cond), torch.zeros_like(pooled))
    negative = [[neg_cond, {"pooled_output": neg_pooled, **spec.extras(w)}]]
    latent = torch.zeros(w.latent_shape)
    return positive, negative, latent
