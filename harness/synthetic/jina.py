"""Jina CLIP v2's text tower in the ComfyUI repack layout (`jina_clip_v2_bf16.safetensors`), for NewBie.

Keys (ComfyUI >= Dec 2025, comfy/text_encoders/jina_clip_2.py): model.embeddings.word_embeddings.weight,
model.embeddings.token_type_embeddings.weight, model.emb_ln.*, model.encoder.layers.N.mixer.Wqkv.*,
mixer.out_proj.*, norm1.*, mlp.fc1.*, mlp.fc2.*, norm2.*, plus a `spiece_model` uint8 tensor holding the
SentencePiece tokenizer. ComfyUI 0.3.75 has no Jina model; the pack's NewBie loader reads the shapes.

The tiny variant keeps width 1024 (NewBie's DiT takes 1024-d pooled vectors) and shrinks layers, FFN and
the vocabulary (to the embedded tokenizer's size, which bounds every id it emits).
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import torch

from .spec import BYTES, EMBEDDING, SpecList, TensorSpec

# XLM-RoBERTa's special ids: <s> 0, <pad> 1, </s> 2, <unk> 3.
BOS, PAD, EOS, UNK = 0, 1, 2, 3
TOKENIZER_VOCAB = 512

_CORPUS = """\
<character_1> <n>hatsune miku</n> <gender>1girl</gender> <appearance>twintails, aqua hair, aqua eyes</appearance>
</character_1> <general_tags> <count>1girl</count> <style>anime, watercolor</style> </general_tags>
<background>city street at night, neon lights</background> <quality>masterpiece, best quality</quality>
1girl, solo, long hair, looking at viewer, smile, school uniform, outdoors, cherry blossoms
a landscape painting of mountains and a lake at sunset, dramatic clouds, golden hour
low quality, worst quality, blurry, jpeg artifacts, bad anatomy, watermark
two cats playing with a ball of yarn on a carpet, cozy living room, warm light
"""


@dataclass(frozen=True)
class JinaConfig:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    type_vocab: int = 1

    def __post_init__(self):
        if self.hidden % self.heads or self.hidden // self.heads != 64:
            raise ValueError(f"JinaConfig: heads of 64 required (loaders infer heads = hidden / 64), got "
                             f"hidden {self.hidden} / heads {self.heads}")
        if self.layers < 1:
            raise ValueError("JinaConfig.layers must be >= 1")


JINA_FULL = JinaConfig(hidden=1024, layers=24, heads=16, ffn=4096, vocab=250002)
JINA_TINY = JinaConfig(hidden=1024, layers=2, heads=16, ffn=64, vocab=TOKENIZER_VOCAB)


def override(cfg: JinaConfig, full: JinaConfig) -> dict:
    """model_options for ComfyUI's own Jina loader (newer ComfyUI); the pack's loader reads the shapes."""
    fields = (("hidden_size", "hidden"), ("num_hidden_layers", "layers"), ("num_attention_heads", "heads"),
              ("intermediate_size", "ffn"), ("vocab_size", "vocab"))
    diff = {k: getattr(cfg, a) for k, a in fields if getattr(cfg, a) != getattr(full, a)}
    return {"jina_clip_2_model_config": diff} if diff else {}


@functools.lru_cache(maxsize=None)
def tokenizer_model_bytes(vocab_size: int = TOKENIZER_VOCAB) -> bytes:
    """A SentencePiece model trained in-process with XLM-R's special ids; deterministic per version.

    >>> import sentencepiece
    >>> sp = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_model_bytes())
    >>> (sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id()), sp.get_piece_size() <= TOKENIZER_VOCAB
    ((0, 1, 2, 3), True)
    """
    import sentencepiece  # optional dependency: only files with an embedded tokenizer need it

    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()]
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, hard_vocab_limit=False, num_threads=1, bos_id=BOS, pad_id=PAD, eos_id=EOS,
        unk_id=UNK, character_coverage=1.0, minloglevel=2)
    return out.getvalue()


def jina_specs(cfg: JinaConfig, dtype: torch.dtype = torch.bfloat16) -> list[TensorSpec]:
    d = cfg.hidden
    s = SpecList(dtype, prefix="model.")
    s.add("embeddings.word_embeddings.weight", (cfg.vocab, d), EMBEDDING)
    s.add("embeddings.token_type_embeddings.weight", (cfg.type_vocab, d), EMBEDDING)
    s.norm("emb_ln", d)
    for i in range(cfg.layers):
        p = f"encoder.layers.{i}."
        s.linear(f"{p}mixer.Wqkv", 3 * d, d)
        s.linear(f"{p}mixer.out_proj", d, d)
        s.norm(f"{p}norm1", d)
        s.linear(f"{p}mlp.fc1", cfg.ffn, d)
        s.linear(f"{p}mlp.fc2", d, cfg.ffn)
        s.norm(f"{p}norm2", d)
    payload = tokenizer_model_bytes()
    s.prefix = ""
    s.add("spiece_model", (len(payload),), BYTES, dtype=torch.uint8, data=lambda: payload)
    return s.specs
