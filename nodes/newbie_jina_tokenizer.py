"""Jina CLIP v2's tokenizer (XLM-RoBERTa ids) from the files users have; no ComfyUI import.

XLM-R ids: <s> 0, <pad> 1, </s> 2, <unk> 3, then the SentencePiece pieces. Three sources:
- a SentencePiece model whose own ids already are these (bos 0, pad 1, eos 2, unk 3): used as is;
- XLM-R's original `sentencepiece.bpe.model` (fairseq order: unk 0, bos 1, eos 2): piece ids are shifted
  by one and unknown pieces map to 3, as Hugging Face's XLMRobertaTokenizer does;
- a Hugging Face `tokenizer.json` (read with the `tokenizers` package), whose post-processor adds <s> </s>.

Calling the tokenizer gives {"input_ids": [0, ..., 2]}, the interface ComfyUI's SDTokenizer expects.
"""
from __future__ import annotations

from dataclasses import dataclass

BOS, PAD, EOS, UNK = 0, 1, 2, 3
SPIECE, TOKENIZER_JSON = "spiece", "tokenizer.json"


class TokenizerError(ValueError):
    pass


@dataclass(frozen=True)
class TokenizerSource:
    kind: str            # SPIECE (model bytes) or TOKENIZER_JSON (file text)
    data: bytes | str
    origin: str          # where it came from, for messages: "spiece_model in jina.safetensors"

    def __post_init__(self):
        if self.kind not in (SPIECE, TOKENIZER_JSON):
            raise ValueError(f"TokenizerSource.kind {self.kind!r}: use {SPIECE!r} or {TOKENIZER_JSON!r}")


class JinaTokenizer:
    """XLM-R token ids for a text, with <s> and </s> around it.

    >>> import sentencepiece, io
    >>> buf = io.BytesIO()
    >>> sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(["a cat on a mat"] * 20),
    ...     model_writer=buf, vocab_size=30, bos_id=0, pad_id=1, eos_id=2, unk_id=3, minloglevel=2,
    ...     hard_vocab_limit=False, num_threads=1)
    >>> tok = JinaTokenizer(TokenizerSource(SPIECE, buf.getvalue(), "test"))
    >>> ids = tok("a cat")["input_ids"]; ids[0], ids[-1], len(ids) > 2
    (0, 2, True)
    """

    def __init__(self, source: TokenizerSource):
        self.source = source
        self._encode, self._vocab = _BUILDERS[source.kind](source)

    @classmethod
    def from_pretrained(cls, source: TokenizerSource, **_kwargs) -> "JinaTokenizer":
        # The constructor ComfyUI's SDTokenizer calls with its tokenizer_path.
        return cls(source)

    def __call__(self, text: str) -> dict:
        return {"input_ids": [BOS] + self._encode(text) + [EOS]}

    def get_vocab(self) -> dict[str, int]:
        return self._vocab()


def _from_spiece(source: TokenizerSource):
    import sentencepiece  # ComfyUI depends on it

    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=bytes(source.data))
    except (RuntimeError, TypeError, OSError) as e:
        raise TokenizerError(f"{source.origin} is not a SentencePiece model ({e})") from None
    ids = (sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id())
    n = sp.get_piece_size()
    if ids == (BOS, PAD, EOS, UNK):
        def encode(text):
            return list(sp.encode(text))

        def vocab():
            return {sp.id_to_piece(i): i for i in range(n)}
    elif (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2):
        # fairseq order: pieces 3.. become 4..; SentencePiece's unk (0) becomes <unk> 3.
        def encode(text):
            return [i + 1 if i >= 3 else UNK for i in sp.encode(text)]

        def vocab():
            out = {"<s>": BOS, "<pad>": PAD, "</s>": EOS, "<unk>": UNK}
            out.update({sp.id_to_piece(i): i + 1 for i in range(3, n)})
            out["<mask>"] = n + 1
            return out
    else:
        raise TokenizerError(
            f"{source.origin}: SentencePiece special ids bos/pad/eos/unk = {ids} match neither XLM-RoBERTa's "
            "(0, 1, 2, 3) nor the fairseq model's (1, -, 2, 0); this is not Jina CLIP v2's tokenizer")
    return encode, vocab


def _from_tokenizer_json(source: TokenizerSource):
    from tokenizers import Tokenizer  # ComfyUI depends on it (through transformers)

    try:
        tok = Tokenizer.from_str(source.data)
    except Exception as e:  # noqa: BLE001  (the Rust side raises a plain Exception for bad JSON)
        raise TokenizerError(f"{source.origin} is not a tokenizers JSON file ({e})") from None
    special = [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")]
    if special != [BOS, PAD, EOS, UNK]:
        raise TokenizerError(f"{source.origin}: ids of <s> <pad> </s> <unk> are {special}, not XLM-RoBERTa's "
                             "[0, 1, 2, 3]; this is not Jina CLIP v2's tokenizer")

    def encode(text):
        return [i for i in tok.encode(text, add_special_tokens=False).ids]

    return encode, tok.get_vocab


_BUILDERS = {SPIECE: _from_spiece, TOKENIZER_JSON: _from_tokenizer_json}
