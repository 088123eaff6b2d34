"""NewBie's text-encoder files: what a file holds, its layout -> ComfyUI's keys, its tokenizer, fp8 weights.

No ComfyUI import. Layouts read (all end in ComfyUI's "model.*" keys):

| model | layout | keys | tokenizer |
|---|---|---|---|
| Gemma-3-4B-it | ComfyUI repack | model.layers.N.* | `spiece_model` tensor |
| | HF multimodal (sharded) | language_model.model.* / model.language_model.* (vision tower not read) | tokenizer.model beside |
| | HF text-only / NewBie nodes converter | model.* / language_model.* | tokenizer.model beside / in the metadata |
| Jina CLIP v2 | ComfyUI repack | model.embeddings.*, model.encoder.layers.N.mixer.Wqkv.* | `spiece_model` tensor |
| | HF jina-clip-v2 / NewBie nodes converter | text_model.transformer[.roberta].*, LoRA parametrizations | tokenizer.json beside / in the metadata |

The Hugging Face Jina checkpoint stores its text tower with `torch.nn.utils.parametrize` LoRA adapters
(`<layer>.parametrizations.weight.original` plus `...weight.0.lora_A/lora_B`, one slice per task); the
tower jina-clip-v2 runs applies its default task's adapter (`retrieval.query`), so that slice is merged:
W + (alpha / rank) * B @ A (embeddings: A @ B).
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..quant import QuantConfig, quantize_file, quantize_weight
from ..quant.stream import Progress
from ..quant.safetensors_io import open_safetensors, read_tensor
from .jina_clip_v2 import config_from_state_dict
from .newbie_jina_tokenizer import SPIECE, TOKENIZER_JSON, TokenizerSource
from .model_families import keep_filter

log = logging.getLogger("lowvram")
GEMMA_HEAD_DIM = 256
GEMMA3_4B = {"vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
             "num_attention_heads": 8, "num_key_value_heads": 4}
NEWBIE_CAP_FEAT_DIM, NEWBIE_CLIP_TEXT_DIM = 2560, 1024
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")
_METADATA_TOKENIZERS = "tokenizer_files"  # ComfyUI-Newbie-Nodes' converter: {file name: base64}


class TextEncoderFileError(ValueError):
    pass


class TokenizerMissingError(TextEncoderFileError):
    pass


def _has(keys, suffix) -> bool:
    return any(k.endswith(suffix) for k in keys)


@dataclass(frozen=True)
class TEKind:
    name: str
    description: str
    matches: Callable[[set], bool]


# Ordered: multimodal checkpoints also hold vision towers whose keys look like CLIP's.
TE_KINDS = (
    TEKind("jina", "Jina CLIP v2", lambda k: _has(k, "encoder.layers.0.mixer.Wqkv.weight")
           or _has(k, "encoder.layers.0.mixer.Wqkv.parametrizations.weight.original")),
    TEKind("gemma3", "Gemma-3 (NewBie's text encoder)", lambda k: _has(k, "layers.0.self_attn.q_norm.weight")
           and _has(k, "layers.0.post_feedforward_layernorm.weight")),
    TEKind("gemma2", "Gemma-2-2B (Lumina-Image-2.0's text encoder)",
           lambda k: _has(k, "layers.0.post_feedforward_layernorm.weight")),
    TEKind("qwen3", "Qwen3 (Z-Image's text encoder)", lambda k: _has(k, "layers.0.self_attn.q_norm.weight")),
    TEKind("clip", "a CLIP text encoder (SD / SDXL / Flux)", lambda k: _has(k, "encoder.layers.0.mlp.fc1.weight")
           or _has(k, "transformer.resblocks.0.ln_1.weight")),
    TEKind("t5", "a T5 text encoder (Flux / SD3)", lambda k: _has(k, "block.0.layer.0.SelfAttention.q.weight")),
    TEKind("diffusion", "a diffusion model", lambda k: _has(k, "cap_embedder.1.weight")
           or _has(k, "double_blocks.0.img_attn.qkv.weight") or _has(k, "input_blocks.0.0.weight")),
    TEKind("vae", "a VAE", lambda k: _has(k, "decoder.conv_in.weight")),
)


@dataclass(frozen=True)
class TextEncoderFile:
    kind: str                            # "gemma3" | "jina"
    path: str
    layout: str
    state_dict: dict = field(repr=False)  # ComfyUI keys; fp8 weights come with `<layer>.weight_scale`
    tokenizer: TokenizerSource
    config: dict                         # architecture read from the shapes
    notes: tuple[str, ...] = ()


def shard_paths(path: str) -> list[str]:
    """All shards of `model-00001-of-00002.safetensors`-style files (the path itself otherwise)."""
    m = _SHARD.match(os.path.basename(path))
    if not m:
        return [path]
    folder, n = os.path.dirname(path), int(m.group("n"))
    paths = [os.path.join(folder, f"{m.group('stem')}-{i:05d}-of-{n:05d}.safetensors") for i in range(1, n + 1)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise TextEncoderFileError(f"{os.path.basename(path)} is shard {m.group('i')} of {n}, but "
                                   f"{', '.join(map(os.path.basename, missing))} is missing beside it")
    return paths


def _header(paths: list[str]) -> tuple[set, dict]:
    keys, metadata = set(), {}
    for p in paths:
        with open_safetensors(p) as f:
            keys |= set(f.keys())
            metadata.update(f.metadata() or {})
    return keys, metadata


def identify(path: str) -> TEKind | None:
    keys, _ = _header(shard_paths(path))
    return next((kind for kind in TE_KINDS if kind.matches(keys)), None)


def is_comfyui_repack(path: str) -> bool:
    """True for ComfyUI's repack layout ("model.*" keys and an embedded `spiece_model`), from the header."""
    keys, _ = _header(shard_paths(path))
    return "spiece_model" in keys and any(k.startswith("model.") for k in keys)


def expect_kind(path: str, want: str, slot: str) -> None:
    """Raise TextEncoderFileError unless `path` holds the `want` text encoder; the message says what it is."""
    kind = identify(path)
    if kind is not None and kind.name == want:
        return
    wanted = next(k.description for k in TE_KINDS if k.name == want)
    found = kind.description if kind else "no text encoder this pack knows"
    hints = {"jina": " It belongs in jina_name.", "gemma3": " It belongs in gemma_name."}
    hint = hints.get(kind.name, "") if kind else ""
    raise TextEncoderFileError(f"{slot}: {os.path.basename(path)} is {found}, not {wanted}.{hint}")


def _prefix(keys: set, probe: str, candidates: tuple[str, ...], path: str) -> str:
    for p in candidates:
        if p + probe in keys:
            return p
    raise TextEncoderFileError(f"{os.path.basename(path)}: no key ends in {probe} under any of the prefixes "
                               f"{', '.join(repr(c) for c in candidates)}; the layout is unknown")


def _beside(path: str, names: tuple[str, ...]) -> str | None:
    folder = os.path.dirname(os.path.abspath(path))
    for d in (folder, os.path.dirname(folder)):
        for n in names:
            if os.path.isfile(os.path.join(d, n)):
                return os.path.join(d, n)
    return None


def _tokenizer(paths, keys, metadata, choices, what: str) -> TokenizerSource:
    """From the `spiece_model` tensor, the metadata's tokenizer files, or a file beside (first found)."""
    name = os.path.basename(paths[0])
    if "spiece_model" in keys:
        for p in paths:
            with open_safetensors(p) as f:
                if "spiece_model" in f.keys():
                    data = read_tensor(f, "spiece_model", p).numpy().tobytes()
                    return TokenizerSource(SPIECE, data, f"spiece_model in {name}")
    files = json.loads(metadata.get(_METADATA_TOKENIZERS, "{}"))
    for fname, kind in choices:
        if fname in files:
            raw = base64.b64decode(files[fname])
            return TokenizerSource(kind, raw.decode() if kind == TOKENIZER_JSON else raw, f"{fname} in {name}")
    found = _beside(paths[0], tuple(f for f, _ in choices))
    if found is None:
        raise TokenizerMissingError(
            f"{name} carries no tokenizer (no spiece_model tensor) and none of "
            f"{', '.join(f for f, _ in choices)} is beside it or in its parent folder. Put {what}'s "
            f"{choices[0][0]} next to the file, or use the ComfyUI repack that embeds it.")
    kind = dict(choices)[os.path.basename(found)]
    with open(found, "rb") as fh:
        raw = fh.read()
    return TokenizerSource(kind, raw.decode() if kind == TOKENIZER_JSON else raw, found)


def _read(paths, cfg: QuantConfig | None, keep, prefix: str, progress: Progress | None = None,
          device: torch.device | str = "cpu") -> tuple[dict, str]:
    """Tensors under `prefix` (prefix stripped), fp8 + weight_scale for what `keep` does not keep, quantized on
    `device` (results on the CPU either way). `progress(done, total)`: per shard, after each tensor."""
    sd, layouts = {}, set()
    for p in paths:
        qf = quantize_file(p, cfg or QuantConfig(), keep if cfg else (lambda *_: True), prefix=prefix,
                           device=device, progress=progress)
        sd.update(qf.state_dict)
        layouts.add(qf.layout)
    return sd, "+".join(sorted(layouts))


def _gemma_config(sd: dict, path: str) -> dict:
    def shape(key):
        if key not in sd:
            raise TextEncoderFileError(f"{os.path.basename(path)}: Gemma key {key} is missing; the file is incomplete")
        return tuple(sd[key].shape)

    vocab, hidden = shape("model.embed_tokens.weight")
    layers = len({k.split(".")[2] for k in sd if k.startswith("model.layers.")})
    q, k = shape("model.layers.0.self_attn.q_proj.weight")[0], shape("model.layers.0.self_attn.k_proj.weight")[0]
    if hidden != NEWBIE_CAP_FEAT_DIM or q % GEMMA_HEAD_DIM or k % GEMMA_HEAD_DIM:
        raise TextEncoderFileError(
            f"{os.path.basename(path)} is a Gemma-3 with hidden size {hidden}; NewBie was trained on "
            f"Gemma-3-4B-it ({NEWBIE_CAP_FEAT_DIM}-d features). Use gemma_3_4b_it (bf16 or fp8).")
    found = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
             "num_attention_heads": q // GEMMA_HEAD_DIM, "num_key_value_heads": k // GEMMA_HEAD_DIM,
             "intermediate_size": shape("model.layers.0.mlp.gate_proj.weight")[0]}
    return {name: v for name, v in found.items() if GEMMA3_4B[name] != v}


_GEMMA_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_GEMMA_KEEP = (r"(model\.)?embed_tokens",)  # a lookup table: fp8 would need a per-row gather path


def read_gemma(path: str, fp8: QuantConfig | None = None, progress: Progress | None = None,
               device: torch.device | str = "cpu") -> TextEncoderFile:
    """Gemma-3-4B-it from any layout above, in ComfyUI's keys; fp8 (per-channel) when `fp8` is given, quantized
    on `device` (same bytes; at 6 GiB on the H200 NewBieTextEncoderLoader's loading stage took 2.3-2.5 s with the
    GPU quantizing against 3.6-4.2 s with the CPU, bench/results/workflows_e2e_*T2249 / T2304)."""
    expect_kind(path, "gemma3", "gemma_name")
    paths = shard_paths(path)
    keys, metadata = _header(paths)
    prefix = _prefix(keys, "layers.0.self_attn.q_norm.weight", _GEMMA_PREFIXES, path)
    if prefix == "model.":
        # ComfyUI's layout is read whole: a scaled-fp8 file keeps its marker outside "model.".
        raw, layout = _read(paths, fp8, keep_filter(_GEMMA_KEEP), "", progress, device)
        items = [(k[len(prefix):], t) for k, t in raw.items() if k.startswith(prefix)]
    else:
        raw, layout = _read(paths, fp8, keep_filter(_GEMMA_KEEP), prefix, progress, device)
        items = list(raw.items())
    # Only the language model: lm_head, rotary buffers and anything else a converter saved are dropped.
    sd = {"model." + rest: t for rest, t in items
          if rest.startswith(("layers.", "embed_tokens.", "norm.")) and "rotary_emb" not in rest}
    tok = _tokenizer(paths, keys, metadata, (("tokenizer.model", SPIECE),), "google/gemma-3-4b-it")
    style = "ComfyUI" if prefix == "model." and "spiece_model" in keys else f"HF ({prefix!r} keys)"
    return TextEncoderFile("gemma3", path, f"{style}, {layout}", sd, tok, _gemma_config(sd, path))


_JINA_PREFIXES = ("text_model.transformer.roberta.", "text_model.transformer.", "roberta.", "model.", "")
_PARAM_ORIGINAL = ".parametrizations.weight.original"
_LORA = re.compile(r"^(?P<layer>.*)\.parametrizations\.weight\.0\.lora_(?P<ab>[AB])$")
_JINA_LINEAR = (r"model\.encoder\.layers\.\d+\.mixer\.Wqkv", r"model\.encoder\.layers\.\d+\.mixer\.out_proj",
                r"model\.encoder\.layers\.\d+\.mlp\.fc1", r"model\.encoder\.layers\.\d+\.mlp\.fc2")


def _lora_settings(path: str, metadata: dict, tasks: int) -> tuple[int, float, str]:
    """(task index, alpha, source) of the adapter the jina-clip-v2 text tower runs by default."""
    cfg_text = metadata.get("config")
    cfg_file = _beside(path, ("config.json",))
    if cfg_text is None and cfg_file:
        with open(cfg_file) as fh:
            cfg_text = fh.read()
    if cfg_text:
        text_cfg = json.loads(cfg_text).get("text_config", {})
        kw = text_cfg.get("hf_model_config_kwargs", {})
        names = kw.get("lora_adaptations") or []
        task = text_cfg.get("default_lora_task")
        if task in names:
            return names.index(task), float(kw.get("lora_alpha", 1)), cfg_file or "the file's metadata"
    if tasks == 1:
        # jina-clip-v2's config.json: one adaptation (retrieval.query), lora_alpha 4.
        return 0, 4.0, "jina-clip-v2 defaults (no config.json beside the file)"
    raise TextEncoderFileError(
        f"{os.path.basename(path)} carries {tasks} LoRA adaptations and no config.json beside it names the "
        "default one; put jina-clip-v2's config.json next to the file")


def _merge_lora(sd: dict, path: str, metadata: dict) -> list[str]:
    pairs: dict[str, dict] = {}
    for k in [k for k in sd if _LORA.match(k)]:
        m = _LORA.match(k)
        pairs.setdefault(m.group("layer"), {})[m.group("ab")] = sd.pop(k)
    for k in [k for k in sd if k.endswith(_PARAM_ORIGINAL)]:
        sd[k[: -len(_PARAM_ORIGINAL)] + ".weight"] = sd.pop(k)
    if not pairs:
        return []
    tasks = next(iter(pairs.values()))["A"].shape[0]
    idx, alpha, source = _lora_settings(path, metadata, tasks)
    for layer, ab in pairs.items():
        w = sd[layer + ".weight"]
        a, b = ab["A"][idx].float(), ab["B"][idx].float()
        if (b.shape[0], a.shape[1]) == tuple(w.shape):    # Linear: B [out, r] @ A [r, in]
            delta, rank = b @ a, a.shape[0]
        elif (a.shape[0], b.shape[1]) == tuple(w.shape):  # Embedding: A [V, r] @ B [r, D]
            delta, rank = a @ b, a.shape[1]
        else:
            raise TextEncoderFileError(f"{os.path.basename(path)}: the LoRA of {layer} does not fit its weight "
                                       f"{list(w.shape)}")
        sd[layer + ".weight"] = (w.float() + delta * (alpha / rank)).to(w.dtype)
    return [f"merged the default LoRA adapter (task {idx}, alpha {alpha:g}) into {len(pairs)} layers; from {source}"]


def read_jina(path: str, fp8: QuantConfig | None = None, progress: Progress | None = None) -> TextEncoderFile:
    """Jina CLIP v2's text tower from any layout above, in ComfyUI's keys; fp8 encoder Linears if asked."""
    expect_kind(path, "jina", "jina_name")
    paths = shard_paths(path)
    keys, metadata = _header(paths)
    probe = next(p for p in ("encoder.layers.0.mixer.Wqkv.weight",
                             "encoder.layers.0.mixer.Wqkv.parametrizations.weight.original") if _has(keys, p))
    prefix = _prefix(keys, probe, _JINA_PREFIXES, path)
    raw, layout = _read(paths, None, None, prefix, progress)
    raw = {k: t for k, t in raw.items() if k.startswith(("embeddings.", "emb_ln.", "encoder.layers."))}
    notes = _merge_lora(raw, path, metadata)
    sd = {"model." + k: t for k, t in raw.items()}
    cfg = config_from_state_dict(sd)
    if cfg.hidden_size != NEWBIE_CLIP_TEXT_DIM:
        raise TextEncoderFileError(f"{os.path.basename(path)}: a Jina text tower of width {cfg.hidden_size}; "
                                   f"NewBie's DiT takes {NEWBIE_CLIP_TEXT_DIM}-d Jina CLIP v2 vectors")
    if fp8 is not None:
        quantized = keep_filter(_JINA_LINEAR)
        for k in [k for k in sd if k.endswith(".weight") and quantized(k, ())]:
            w = sd[k]
            if w.dtype.is_floating_point and w.element_size() > 1:
                sd[k], sd[k[: -len(".weight")] + ".weight_scale"] = quantize_weight(w, fp8.fmt, fp8.granularity)
    tok = _tokenizer(paths, keys, metadata, ((TOKENIZER_JSON, TOKENIZER_JSON), ("sentencepiece.bpe.model", SPIECE)),
                     "jinaai/jina-clip-v2")
    style = "ComfyUI" if prefix == "model." else f"HF ({prefix!r} keys)"
    config = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                           "intermediate_size", "type_vocab_size")}
    return TextEncoderFile("jina", path, f"{style}, {layout}", sd, tok, config, tuple(notes))
