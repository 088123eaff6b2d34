"""A small SentencePiece model trained in-process, for the `spiece_model` tensor Gemma files carry.

ComfyUI's Gemma tokenizer (text_encoders/spiece_tokenizer.py) is built from that tensor's bytes, so a
synthetic Gemma file needs one. Special ids follow Gemma's: pad 0, eos 1, bos 2, unk 3 (ComfyUI's
Gemma3_4BModel uses start=2, pad=0). byte_fallback keeps any prompt encodable without <unk>.
"""
from __future__ import annotations

import functools
import io

VOCAB_SIZE = 512   # 256 byte pieces + 4 specials + learned pieces; every id stays < this

_CORPUS = """\
a photo of a cat sitting on a wooden table in the morning light
1girl, solo, long hair, looking at viewer, smile, blue eyes, school uniform, outdoors, cherry blossoms
<character_1> <n>miku</n> <gender>1girl</gender> <appearance>twintails, aqua hair</appearance> </character_1>
<general_tags> <count>1girl</count> <style>anime, watercolor</style> <background>city street at night</background>
<quality>masterpiece, best quality, highres</quality> </general_tags>
a landscape painting of mountains and a lake at sunset, dramatic clouds, golden hour
portrait of an old man with a beard, studio lighting, black and white photography
a red sports car driving along a coastal road, motion blur, cinematic
an astronaut riding a horse on the moon, digital art, highly detailed
a bowl of fruit with apples, oranges and grapes, still life, oil on canvas
You are an assistant designed to generate high-quality images based on user prompts. <Prompt Start>
the quick brown fox jumps over the lazy dog while the sun sets behind the hills
close-up of a flower with dew drops, macro photography, shallow depth of field
a futuristic city skyline with flying cars and neon signs in the rain
two cats playing with a ball of yarn on a carpet, cozy living room
"""


@functools.lru_cache(maxsize=None)
def tokenizer_model_bytes(vocab_size: int = VOCAB_SIZE) -> bytes:
    """Serialized SentencePiece ModelProto; deterministic for a given sentencepiece version.

    >>> import sentencepiece
    >>> sp = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_model_bytes())
    >>> sp.get_piece_size() <= VOCAB_SIZE and sp.bos_id() == 2 and sp.pad_id() == 0
    True
    """
    import sentencepiece  # optional dependency: only Gemma files need it

    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()]
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, hard_vocab_limit=False, num_threads=1, pad_id=0, eos_id=1, bos_id=2,
        unk_id=3, character_coverage=1.0, normalization_rule_name="identity", minloglevel=2)
    return out.getvalue()
