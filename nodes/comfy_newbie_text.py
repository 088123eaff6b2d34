"""ComfyUI adapter: NewBie-image's two text encoders as one ComfyUI CLIP (Gemma-3-4B-it + Jina CLIP v2).

The CLIP mirrors ComfyUI's later native one (comfy/text_encoders/newbie.py, DualCLIPLoader type "newbie"):
its tokenizer gives {"gemma": ..., "jina": ...}, and encoding returns Gemma's second-to-last hidden states
[1, L, 2560] with their attention mask, and Jina's mean-pooled vector [1, 1024] as "pooled_output". So
CLIPTextEncode, CLIPSetLastLayer, hooks and scheduling work on it, and NewBieTextEncode works on ComfyUI's
native NewBie CLIP too. Gemma is ComfyUI's own model (comfy/text_encoders/llama.py); Jina's text tower is
nodes/jina_clip_v2.py built with ComfyUI's operations, so fp8 / NF4 / manual-cast layers, device moves
and memory accounting go through ComfyUI's ModelPatcher like any text encoder.

Where ComfyUI has native NewBie text encoding and the files are its repacks, "default" weights on the
default device are loaded by ComfyUI itself; everything else (fp8, NF4, CPU, Hugging Face layouts) here.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

import comfy.model_management
import comfy.sd
import comfy.text_encoders.lumina2
from comfy import sd1_clip

from ..quant import QuantConfig, resolve_compute
from ._comfy_progress import LoadProgress
from .comfy_fp8_loading import quantize_on_device
from .comfy_fp8_ops import make_fp8_ops
from .jina_clip_v2 import JinaTextConfig, JinaTextModel
from .newbie_jina_tokenizer import EOS, PAD, JinaTokenizer
from .newbie_te_files import TextEncoderFileError, expect_kind, is_comfyui_repack, read_gemma, read_jina

log = logging.getLogger("lowvram")
WEIGHT_FORMATS = ("default", "fp8", "nf4")
DEVICES = ("default", "cpu")
JINA_MAX_TOKENS = 8192  # Jina-XLM-RoBERTa's rotary range (the official NewBie nodes cut at 8000)


@dataclass(frozen=True)
class NewBieTEConfig:
    weight_format: str = "default"
    device: str = "default"
    fp8: QuantConfig = field(default_factory=QuantConfig)  # per-channel e4m3fn, auto compute

    def __post_init__(self):
        for name, allowed in (("weight_format", WEIGHT_FORMATS), ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")


class RunOnLoadDevice:
    """An SDClipModel mixin: the encoder runs on its patcher's load device, wherever its embedding table is.

    ComfyUI 0.3.64-0.3.75 run an encoder on the device of its input embedding's weight (SDClipModel.forward).
    A partial load offloads the largest modules first, and Gemma's embedding ([262144, 2560] bf16, 1.25 GiB) is
    the largest: at 6 GiB the whole encoder then ran on the CPU, 5-9 s a prompt on the H200
    (bench/results/workflows_e2e_*T1656), while the layers ComfyUI had loaded sat on the GPU. Here the tokens go
    to the load device instead and every offloaded layer, the embedding too, is cast there per call as ComfyUI
    casts any lowvram layer. Newer ComfyUI picks the same device itself (its `execution_device` option).
    """

    run_device: torch.device | None = None  # set by NewBieTEModel.run_on once the patcher exists

    def process_tokens(self, tokens, device):
        return super().process_tokens(tokens, self.run_device or device)


class NewBieGemma(RunOnLoadDevice, comfy.text_encoders.lumina2.Gemma3_4BModel):
    pass


class JinaTextTransformer(torch.nn.Module):
    """nodes/jina_clip_v2 in the shape SDClipModel drives: (config, dtype, device, operations)."""

    def __init__(self, config_dict, dtype, device, operations):
        super().__init__()
        cfg = JinaTextConfig(**config_dict)
        self.num_layers = cfg.num_layers
        self.model = JinaTextModel(cfg, ops=operations, device=device, dtype=dtype)

    def get_input_embeddings(self):
        return self.model.embeddings.word_embeddings

    def forward(self, input_ids, attention_mask=None, embeds=None, num_tokens=None, intermediate_output=None,
                final_layer_norm_intermediate=True, dtype=None, embeds_info=()):
        hidden, pooled = self.model(input_ids, attention_mask, embeds=embeds)
        return hidden, None, pooled  # (last, intermediate, pooled) as SDClipModel reads them


class JinaClip2TextModel(RunOnLoadDevice, sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, config=None):
        super().__init__(device=device, dtype=dtype, textmodel_json_config=dict(config or {}),
                         model_class=JinaTextTransformer, special_tokens={"start": 0, "end": EOS, "pad": PAD},
                         enable_attention_masks=True, return_attention_masks=True,
                         model_options={**model_options, "model_name": "jina_clip_2"})


class JinaClip2Tokenizer(sd1_clip.SDTokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(tokenizer_data["jina_tokenizer"], max_length=JINA_MAX_TOKENS, pad_with_end=False,
                         embedding_directory=embedding_directory, embedding_size=1024, embedding_key="jina_clip_2",
                         tokenizer_class=JinaTokenizer, has_start_token=True, has_end_token=True,
                         pad_to_max_length=False, min_length=1, pad_token=PAD, end_token=EOS,
                         tokenizer_data=tokenizer_data)


class NewBieTokenizer:
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        gemma_data = {"spiece_model": tokenizer_data["gemma_spiece_model"]}
        self.gemma = comfy.text_encoders.lumina2.Gemma3_4BTokenizer(embedding_directory=embedding_directory,
                                                                    tokenizer_data=gemma_data)
        self.jina = JinaClip2Tokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        return {"gemma": self.gemma.tokenize_with_weights(text, return_word_ids, **kwargs),
                "jina": self.jina.tokenize_with_weights(text, return_word_ids, **kwargs)}

    def untokenize(self, token_weight_pair):
        return self.gemma.untokenize(token_weight_pair)

    def state_dict(self):
        return {}


class NewBieTEModel(torch.nn.Module):
    def __init__(self, device="cpu", dtype=None, model_options={}, gemma_config=None, jina_config=None):
        super().__init__()
        gemma_options = {**model_options, "model_name": "gemma3_4b", "gemma3_4b_model_config": dict(gemma_config or {})}
        self.gemma = NewBieGemma(device=device, dtype=dtype, model_options=gemma_options)
        self.jina = JinaClip2TextModel(device=device, dtype=dtype, model_options=model_options, config=jina_config)
        self.dtypes = {dtype}

    def run_on(self, device: torch.device) -> None:
        """Run both encoders on `device` (the patcher's load device) even when ComfyUI loaded them in part."""
        self.gemma.run_device = self.jina.run_device = torch.device(device)

    def set_clip_options(self, options):
        self.gemma.set_clip_options(options)
        self.jina.set_clip_options(options)

    def reset_clip_options(self):
        self.gemma.reset_clip_options()
        self.jina.reset_clip_options()

    def encode_token_weights(self, token_weight_pairs):
        cond, _, extra = self.gemma.encode_token_weights(token_weight_pairs["gemma"])  # [1, L, 2560], mask
        _, pooled, _ = self.jina.encode_token_weights(token_weight_pairs["jina"])     # [1, 1024]
        return cond, pooled, extra

    def load_sd(self, sd):
        part = self.gemma if "model.layers.0.self_attn.q_norm.weight" in sd else self.jina
        return part.load_sd(sd)


def native_newbie_text() -> bool:
    """True where ComfyUI loads NewBie's encoder pair itself (DualCLIPLoader type "newbie")."""
    return (hasattr(comfy.sd.CLIPType, "NEWBIE")
            and importlib.util.find_spec("comfy.text_encoders.jina_clip_2") is not None)


def _operations(cfg: NewBieTEConfig, load_device: torch.device):
    if cfg.weight_format == "fp8":
        return make_fp8_ops(resolve_compute(cfg.fp8.compute, load_device), cfg.fp8.act_scaling)
    if cfg.weight_format == "nf4":
        from .newbie_nf4 import make_nf4_ops  # imports bitsandbytes, or says how to install it

        return make_nf4_ops(load_device if load_device.type == "cuda" else "cpu")
    return None


def _devices(cfg: NewBieTEConfig) -> tuple[torch.device, torch.device]:
    if cfg.device == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    return comfy.model_management.text_encoder_device(), comfy.model_management.text_encoder_offload_device()


def _check_loaded(part: str, path: str, missing, unexpected) -> None:
    # SDClipModel's own logit_scale is not in text-encoder files.
    missing = [k for k in missing if not k.endswith("logit_scale")]
    if missing or unexpected:
        raise TextEncoderFileError(f"{os.path.basename(path)} did not fill NewBie's {part} exactly: missing "
                                   f"{missing[:8]}, unexpected {list(unexpected)[:8]}")


def load_newbie_text_encoders(gemma_path: str, jina_path: str, cfg: NewBieTEConfig, embedding_directory=None):
    """One ComfyUI CLIP holding both encoders; raises TextEncoderFileError / NF4UnavailableError with the fix."""
    load_device, offload_device = _devices(cfg)
    options = {"load_device": load_device, "offload_device": offload_device}
    if (native_newbie_text() and cfg.weight_format == "default" and cfg.device == "default"
            and is_comfyui_repack(gemma_path) and is_comfyui_repack(jina_path)):
        expect_kind(gemma_path, "gemma3", "gemma_name")
        expect_kind(jina_path, "jina", "jina_name")
        log.info("LowVRAM Kit NewBieTextEncoderLoader: ComfyUI's native NewBie text encoders")
        return comfy.sd.load_clip([gemma_path, jina_path], embedding_directory,
                                  clip_type=comfy.sd.CLIPType.NEWBIE, model_options=options)
    fp8 = cfg.fp8 if cfg.weight_format == "fp8" else None
    if fp8 is not None and load_device.type == "cuda":
        gemma = quantize_on_device(lambda device: read_gemma(gemma_path, fp8, LoadProgress(), device))
    else:
        gemma = read_gemma(gemma_path, fp8, LoadProgress())
    jina = read_jina(jina_path, fp8, LoadProgress())
    ops = _operations(cfg, load_device)
    if ops is not None:
        options["custom_operations"] = ops
    # bf16 for the layers that stay high precision (Gemma overflows fp16); built on the offload device, so
    # that assigning the loaded tensors below never leaves a half-moved model.
    options.update(dtype=torch.bfloat16, initial_device=offload_device)
    target = SimpleNamespace(params={"gemma_config": gemma.config, "jina_config": jina.config},
                             clip=NewBieTEModel, tokenizer=NewBieTokenizer)
    params = sum(t.numel() for f in (gemma, jina) for t in f.state_dict.values())
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, parameters=params, model_options=options,
                         tokenizer_data={"gemma_spiece_model": gemma.tokenizer.data, "jina_tokenizer": jina.tokenizer})
    clip.cond_stage_model.run_on(clip.patcher.load_device)
    for part, f in (("Gemma-3-4B", gemma), ("Jina CLIP v2", jina)):
        _check_loaded(part, f.path, *clip.load_sd(f.state_dict))
    for note in jina.notes:
        log.info("LowVRAM Kit NewBieTextEncoderLoader: %s: %s", os.path.basename(jina_path), note)
    log.info("LowVRAM Kit NewBieTextEncoderLoader: gemma %s (%s), jina %s (%s), weights %s, device %s",
             os.path.basename(gemma_path), gemma.layout, os.path.basename(jina_path), jina.layout,
             cfg.weight_format, load_device)
    return clip
