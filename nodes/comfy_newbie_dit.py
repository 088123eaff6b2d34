"""ComfyUI adapter: NewBie-image's Jina pooled path on ComfyUI 0.3.75's Lumina-2 Next-DiT.

NewBie is Lumina-2's NextDiT (36 layers, caption features 2560) plus two modules:
    clip_text_pooled_proj = Sequential(RMSNorm(1024), Linear(1024, 1024))
    time_text_embed       = Sequential(SiLU, Linear(1024 + 1024, 1024))
    adaln = time_text_embed(cat[t_embedder(t), clip_text_pooled_proj(jina_pooled)])   # [B, 1024]
and `adaln` drives every adaLN (noise refiner, main layers, final layer); without a pooled vector zeros
stand in for the projection. ComfyUI >= 0.4 builds these itself (NextDiT(clip_text_dim=...)) and maps the
conditioning's "pooled_output" to the `clip_text_pooled` keyword; where it does, this module only checks.

On 0.3.75, why this route is the least invasive:
1. The text encoder leaves Jina's vector in the conditioning as "pooled_output", as ComfyUI's own NewBie
   encoder does, so conditioning nodes (zero-out, combine, average, timestep range) handle it and the
   graphs stay valid on newer ComfyUI.
2. An OUTER_SAMPLE wrapper on the patcher we return copies it, on the sampler's own copies of the conds
   and after every conditioning node ran, into `model_conds` as CONDRegular("clip_text_pooled") - what
   0.4's Lumina2.extra_conds does. ComfyUI then batches cond and uncond (different vectors) in the same
   order as the latents, repeats them to the batch, casts to the model dtype and passes the keyword to the
   diffusion model.
3. A DIFFUSION_MODEL wrapper holds that keyword for the duration of one forward, and a forward hook on
   `t_embedder` (PyTorch's own extension point: no ComfyUI function replaced, state-dict keys unchanged)
   turns t_embedder's output into `adaln`. NextDiT feeds t_embedder's output to every adaLN, so this one
   seam is the whole pooled path.
The two modules are attached to the diffusion model we just built, before anything used it, so their
weights are ModelPatcher weights: counted by model_size, patched by LoRA (diffusion_model.time_text_embed.1
...), offloaded and cast like any layer. The file's five Jina-path tensors are taken out of the state dict
before ComfyUI loads it, so 0.3.75 logs no "unet unexpected" and loads them here, strictly.
"""
from __future__ import annotations

import inspect
import logging
import os
import weakref

import torch
from torch import nn

import comfy.conds
import comfy.ldm.lumina.model
import comfy.patcher_extension
import comfy.sd
import comfy.utils

from .comfy_fp8_loading import inspect_file

log = logging.getLogger("lowvram")
WRAPPER_KEY = "lowvram_newbie"
PATH_ATTR = "lowvram_newbie_pooled_path"
JINA_PATH = ("clip_text_pooled_proj.", "time_text_embed.")
JINA_KEYS = ("clip_text_pooled_proj.0.weight", "clip_text_pooled_proj.1.weight", "clip_text_pooled_proj.1.bias",
             "time_text_embed.1.weight", "time_text_embed.1.bias")
# Width of the caption features -> which text encoder made them (for mix-up messages).
CAPTION_SOURCES = {2304: "Gemma-2-2B, Lumina-Image-2.0's text encoder",
                   2560: "Gemma-3-4B (NewBie) or Qwen3-4B (Z-Image)", 4096: "T5-XXL (Flux)"}
FIX = {"newbie": "Encode the prompt with NewBieTextEncoderLoader + NewBieTextEncode (Gemma-3-4B-it and Jina CLIP v2).",
       "lumina2": "Encode it with a Gemma-2-2B CLIP (CLIPLoader, type lumina2) and CLIPTextEncodeLumina2; NewBie's "
                  "text encoders go with a NewBie diffusion model."}
NOT_NEWBIE = {"lumina2": "Lumina-Image-2.0 (Next-DiT without NewBie's Jina pooled path: no clip_text_pooled_proj). "
                         "Load it with Float8DiTLoader or UNETLoader and encode with CLIPTextEncodeLumina2"}


def native_newbie_dit() -> bool:
    """True where ComfyUI's own NextDiT has NewBie's pooled path (ComfyUI >= 0.4)."""
    return "clip_text_dim" in inspect.signature(comfy.ldm.lumina.model.NextDiT.__init__).parameters


def take_extra_weights(sd: dict, family: str, source: str, prefix: str = "") -> dict:
    """Pop NewBie's Jina-path tensors (keys without prefix) before ComfyUI loads `sd`; {} where not needed."""
    if family != "newbie" or native_newbie_dit():
        return {}
    extra = {k[len(prefix):]: sd.pop(k) for k in [k for k in sd if k[len(prefix):].startswith(JINA_PATH)
                                                  and k.startswith(prefix)]}
    missing = [k for k in JINA_KEYS if k not in extra]
    # fp8 scales come along where Float8DiTLoader was told to quantize these layers too.
    unknown = sorted(k for k in set(extra) - set(JINA_KEYS) if not k.endswith(".1.weight_scale"))
    if missing or unknown:
        raise ValueError(f"{os.path.basename(source)}: NewBie's Jina pooled path is incomplete or unknown "
                         f"(missing {missing}, unexpected {unknown}); the file is damaged or not NewBie-image")
    return extra


def attach(patcher, extra: dict, family: str, source: str):
    """Complete a freshly loaded Lumina-2 / NewBie patcher (ours: nobody else holds it yet) and return it."""
    dm = patcher.model.diffusion_model
    check = _diffusion_model_wrapper(family)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, check)
    if family != "newbie":
        return patcher
    if native_newbie_dit():
        if getattr(dm, "clip_text_pooled_proj", None) is None:
            raise ValueError(f"{os.path.basename(source)}: ComfyUI built this NewBie model without its pooled path")
        return patcher
    _build_pooled_path(dm, extra, source)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _pooled_into_conds)
    return patcher


def _build_pooled_path(dm: nn.Module, extra: dict, source: str) -> None:
    # The model's own operations classes (manual cast, fp8, weight-init-free), so ComfyUI casts and offloads
    # these layers like the others. Both stay in high precision (model_families keeps them).
    linear_cls, norm_cls = type(dm.t_embedder.mlp[0]), type(dm.cap_embedder[0])
    ref = dm.t_embedder.mlp[0].weight
    t_dim, c = dm.t_embedder.mlp[2].out_features, extra["clip_text_pooled_proj.0.weight"].shape[0]
    want = {"clip_text_pooled_proj.0.weight": (c,), "clip_text_pooled_proj.1.weight": (c, c),
            "clip_text_pooled_proj.1.bias": (c,), "time_text_embed.1.weight": (t_dim, t_dim + c),
            "time_text_embed.1.bias": (t_dim,)}
    bad = {k: list(extra[k].shape) for k, s in want.items() if tuple(extra[k].shape) != s}
    if bad:
        raise ValueError(f"{os.path.basename(source)}: NewBie pooled-path tensors have shapes {bad}; expected "
                         f"{ {k: list(s) for k, s in want.items()} }")
    kw = {"device": ref.device, "dtype": ref.dtype}
    proj = nn.Sequential(norm_cls(c, eps=dm.cap_embedder[0].eps, elementwise_affine=True, **kw),
                         linear_cls(c, c, bias=True, **kw))
    tte = nn.Sequential(nn.SiLU(), linear_cls(t_dim + c, t_dim, bias=True, **kw))
    for name, module in (("clip_text_pooled_proj", proj), ("time_text_embed", tte)):
        part = {k[len(name) + 1:]: v for k, v in extra.items() if k.startswith(name + ".")}
        module.load_state_dict(part, strict=True)  # every tensor used, no leftovers (shapes checked above)
        setattr(dm, name, module)
    dm.clip_text_dim = c
    path = PooledPath(dm)
    setattr(dm, PATH_ATTR, path)
    dm.t_embedder.register_forward_hook(path.hook)


class PooledPath:
    """The pooled vector of the forward in progress, and the t_embedder hook that applies it."""

    def __init__(self, dm: nn.Module):
        self._dm = weakref.ref(dm)  # the hook lives on dm: a strong reference would be a cycle
        self.pooled: torch.Tensor | None = None
        self._held: torch.Tensor | None = None   # the buffer `set` copies each call's pooled vector into

    def set(self, pooled: torch.Tensor | None) -> None:
        """Hold the pooled vector [B, C] of the forward about to run. It is copied into a buffer of this
        object's that stays the same from call to call: a model call replayed from a CUDA graph
        (ChunkedOffloadUNet's cuda_graphs, captured inside this wrapper) reads the address it captured, so each
        call's values must arrive there. A buffer is never made during a capture (it would outlive it)."""
        held = self._held
        # An inference-mode buffer takes no in-place copy outside inference mode (a later call made otherwise).
        if pooled is None or (held is not None and held.shape == pooled.shape and held.dtype == pooled.dtype
                              and held.device == pooled.device
                              and held.is_inference() == torch.is_inference_mode_enabled()):
            if pooled is not None:
                held.copy_(pooled)
            self.pooled = None if pooled is None else held
            return
        if pooled.is_cuda and torch.cuda.is_current_stream_capturing():
            self.pooled = pooled
            return
        self._held = self.pooled = pooled.clone()

    def hook(self, _module, _args, t_emb: torch.Tensor) -> torch.Tensor:
        dm = self._dm()
        b = t_emb.shape[0]
        if self.pooled is None:
            p = torch.zeros((b, dm.clip_text_dim), device=t_emb.device, dtype=t_emb.dtype)
        else:
            pooled = self.pooled.to(device=t_emb.device, dtype=t_emb.dtype)
            if pooled.shape[0] != b:
                if b % pooled.shape[0]:
                    raise ValueError(f"NewBie: {pooled.shape[0]} pooled vectors for a batch of {b}")
                pooled = pooled.repeat(b // pooled.shape[0], 1)
            p = dm.clip_text_pooled_proj(pooled)
        return dm.time_text_embed(torch.cat((t_emb, p), dim=-1))  # [B, 1024]


def _diffusion_model_wrapper(family: str):
    """Names a caption-width mix-up, and holds the pooled vector for t_embedder's hook during one forward."""
    def forward(executor, x, timesteps, context, num_tokens, attention_mask=None, **kwargs):
        dm = executor.class_obj
        want = dm.cap_embedder[0].weight.shape[0]
        got = context.shape[-1]
        if got != want:
            made_by = CAPTION_SOURCES.get(got, "an unknown encoder")
            raise ValueError(f"the conditioning holds {got}-d text features ({made_by}), but this {family} "
                             f"diffusion model takes {want}-d ({CAPTION_SOURCES.get(want, '?')}). " + FIX[family])
        path = getattr(dm, PATH_ATTR, None)
        if path is None:
            return executor(x, timesteps, context, num_tokens, attention_mask, **kwargs)
        path.set(kwargs.get("clip_text_pooled"))
        try:
            return executor(x, timesteps, context, num_tokens, attention_mask, **kwargs)
        finally:
            path.set(None)
    return forward


def _pooled_into_conds(executor, *args, **kwargs):
    guider = executor.class_obj
    dim = guider.model_patcher.model.diffusion_model.clip_text_dim
    for conds in guider.conds.values():
        for c in conds:
            pooled = c.get("pooled_output")
            if pooled is None:
                continue  # as ComfyUI 0.4: zeros replace the projection
            if pooled.shape[-1] != dim:
                raise ValueError(f"the conditioning's pooled vector has {pooled.shape[-1]} values; NewBie's Jina "
                                 f"path takes {dim}. " + FIX["newbie"])
            c["model_conds"] = {**c.get("model_conds", {}), "clip_text_pooled": comfy.conds.CONDRegular(pooled)}
    return executor(*args, **kwargs)


def read_newbie_file(path: str) -> tuple:
    """The part of the bf16 route that touches no ComfyUI state: check the family from the header (refusing
    another model before reading gigabytes) and read the file. Safe in a worker thread (NewBieDiTLoader)."""
    family, prefix = inspect_file(path)
    if family.name != "newbie":
        why = NOT_NEWBIE.get(family.name, family.why)
        raise ValueError(f"{os.path.basename(path)} is {why}, not NewBie-image. NewBieDiTLoader loads NewBie only.")
    sd = comfy.utils.load_torch_file(path)
    return sd, family, prefix


def build_newbie_dit(path: str, read: tuple, dtype: torch.dtype | None = None):
    """ComfyUI's model from read_newbie_file's result, then the pooled path (on the prompt's thread)."""
    sd, family, prefix = read
    extra = take_extra_weights(sd, family.name, path, prefix)
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype} if dtype else {})
    if patcher is None:
        raise ValueError(f"ComfyUI could not build a model from {os.path.basename(path)}")
    log.info("LowVRAM Kit NewBieDiTLoader: %s loaded (%s)", os.path.basename(path),
             "native pooled path" if native_newbie_dit() else "pooled path attached")
    return attach(patcher, extra, family.name, path)


def load_newbie_dit(path: str, dtype: torch.dtype | None = None):
    """The bf16 (or `dtype`) route: ComfyUI's own loader, then the pooled path. Refuses other families."""
    return build_newbie_dit(path, read_newbie_file(path), dtype)
