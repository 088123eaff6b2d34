"""Jina CLIP v2's text tower (nodes/jina_clip_v2.py), its tokenizer and its file layouts, without ComfyUI.

The tower is checked against two references that share no code with it: one written here from plain
tensor operations (rotary as complex multiplication, GELU from erf, attention from einsum), and, where
transformers has it, Hugging Face's own JinaEmbeddingsV3 port, fed the same weights.
"""
import base64
import doctest
import importlib
import io
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]


def pure(module: str):
    """Import a pack module with its relative imports but without ComfyUI (and without the pack's
    __init__, which registers nodes): under a package name of its own."""
    if "lowvram_pure" not in sys.modules:
        pkg = types.ModuleType("lowvram_pure")
        pkg.__path__ = [str(REPO)]
        sys.modules["lowvram_pure"] = pkg
    return importlib.import_module(f"lowvram_pure.nodes.{module}")


J = pure("jina_clip_v2")
TOK = pure("newbie_jina_tokenizer")
CFG = J.JinaTextConfig(vocab_size=50, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=96)


def random_weights(cfg, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = J.JinaTextModel(cfg)
    sd = {}
    for k, t in model.state_dict().items():
        if k.endswith(("norm1.weight", "norm2.weight", "emb_ln.weight")):
            sd[k] = 1 + 0.1 * torch.randn(t.shape, generator=g)
        elif t.ndim == 2 and "embeddings" not in k:
            sd[k] = torch.randn(t.shape, generator=g) / math.sqrt(t.shape[1])
        else:
            sd[k] = 0.5 * torch.randn(t.shape, generator=g)
    return sd


def reference(w: dict, ids: torch.Tensor, mask: torch.Tensor, heads: int, base=20000.0, eps=1e-5):
    """The tower from plain operations, written from the architecture description, not from the module."""
    d = w["emb_ln.weight"].shape[0]
    hd = d // heads
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0]
    x = F.layer_norm(x, (d,), w["emb_ln.weight"], w["emb_ln.bias"], eps)
    b, L, _ = x.shape
    angle = torch.arange(L, dtype=torch.float64)[:, None] * base ** (-torch.arange(hd // 2, dtype=torch.float64) * 2 / hd)
    turn = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)  # [L, hd/2]

    def rope(t):  # t [B, L, H, hd]; dimension j and j + hd/2 are the real and imaginary parts
        z = torch.complex(t[..., : hd // 2], t[..., hd // 2:]) * turn[None, :, None, :]
        return torch.cat([z.real, z.imag], dim=-1)

    n = 0
    while f"encoder.layers.{n}.norm1.weight" in w:
        p = f"encoder.layers.{n}."
        qkv = x @ w[p + "mixer.Wqkv.weight"].T + w[p + "mixer.Wqkv.bias"]
        q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, L, heads, hd) for i in range(3))
        q, k = rope(q), rope(k)
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        att = torch.einsum("bhlm,bmhd->blhd", scores.softmax(dim=-1), v).reshape(b, L, d)
        x = F.layer_norm(x + att @ w[p + "mixer.out_proj.weight"].T + w[p + "mixer.out_proj.bias"], (d,),
                         w[p + "norm1.weight"], w[p + "norm1.bias"], eps)
        h = x @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = F.layer_norm(x + h @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"], (d,),
                         w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
        n += 1
    m = mask[..., None].float()
    return x, (x * m).sum(1) / m.sum(1)


def batch():
    ids = torch.tensor([[0, 7, 12, 33, 9, 41, 2], [0, 5, 2, 1, 1, 1, 1]])  # second row padded with <pad> 1
    mask = (ids != 1).long()
    return ids, mask


def test_tower_matches_the_plain_reference_in_fp32():
    w = random_weights(CFG)
    model = J.JinaTextModel(CFG)
    model.load_state_dict(w)
    ids, mask = batch()
    with torch.no_grad():
        hidden, pooled = model(ids, mask)
    ref_hidden, ref_pooled = reference(w, ids, mask, CFG.num_heads)
    keep = mask.bool()
    assert (hidden[keep] - ref_hidden[keep]).abs().max() < 1e-5
    assert (pooled - ref_pooled).abs().max() < 1e-5


def test_tower_matches_transformers_jina_embeddings_v3():
    tf = pytest.importorskip("transformers")
    if not hasattr(tf, "JinaEmbeddingsV3Model"):
        pytest.skip("this transformers has no JinaEmbeddingsV3")
    conf = tf.JinaEmbeddingsV3Config(vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size,
                                     num_hidden_layers=CFG.num_layers, num_attention_heads=CFG.num_heads,
                                     intermediate_size=CFG.intermediate_size, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    hf = tf.JinaEmbeddingsV3Model(conf, add_pooling_layer=False).eval()
    w = random_weights(CFG, seed=1)
    names = {"emb_ln": "embeddings.LayerNorm", "mixer.out_proj": "self_attn.o_proj", "norm1": "post_attention_layernorm",
             "norm2": "post_mlp_layernorm", "encoder.layers": "layers"}
    hf_sd = {}
    for k, t in w.items():
        if ".mixer.Wqkv." in k:
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):  # fused rows are q | k | v
                hf_sd[k.replace("encoder.layers", "layers").replace("mixer.Wqkv", f"self_attn.{part}_proj")] = chunk
            continue
        for old, new in names.items():
            k = k.replace(old, new)
        hf_sd[k] = t
    hf.load_state_dict(hf_sd, strict=True)
    ours = J.JinaTextModel(CFG)
    ours.load_state_dict(w)
    ids, mask = batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden, pooled = ours(ids, mask)
    keep = mask.bool()
    assert (hidden[keep] - want[keep]).abs().max() < 1e-4
    m = mask[..., None].float()
    assert (pooled - (want * m).sum(1) / m.sum(1)).abs().max() < 1e-4


def test_padding_changes_nothing_and_the_mean_skips_it():
    model = J.JinaTextModel(CFG)
    model.load_state_dict(random_weights(CFG, seed=2))
    ids, mask = batch()
    with torch.no_grad():
        _, pooled = model(ids, mask)
        alone_hidden, alone = model(ids[1:, :3], mask[1:, :3])
    assert (pooled[1] - alone[0]).abs().max() < 1e-5
    assert (alone[0] - alone_hidden[0].mean(0)).abs().max() < 1e-6
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3


def test_embeds_in_place_of_ids_give_the_same_result():
    model = J.JinaTextModel(CFG)
    model.load_state_dict(random_weights(CFG, seed=3))
    ids, mask = batch()
    with torch.no_grad():
        a = model(ids, mask)[1]
        b = model(None, mask, embeds=model.embeddings.word_embeddings(ids))[1]
    assert torch.equal(a, b)


def test_config_is_read_from_the_shapes_and_bad_dicts_are_named():
    full = J.JinaTextModel(J.JinaTextConfig(), device="meta")
    sd = {J.KEY_PREFIX + k: v for k, v in full.state_dict().items()}
    assert J.config_from_state_dict(sd) == J.JinaTextConfig()
    assert sum(t.numel() for t in sd.values()) == 558_314_496  # research/models.md
    del sd["model.encoder.layers.0.mlp.fc1.weight"]
    with pytest.raises(ValueError, match="model.encoder.layers.0.mlp.fc1.weight is missing"):
        J.config_from_state_dict(sd)
    with pytest.raises(ValueError, match="hidden_size 100 must split into 3 heads"):
        J.JinaTextConfig(hidden_size=100, num_heads=3)


# ---------------------------------------------------------------- tokenizer

def spiece(**ids) -> bytes:
    import sentencepiece

    text = ["1girl, solo, aqua hair, twintails, smile", "a cat on a wooden table", "masterpiece, best quality"]
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text * 20), model_writer=buf, vocab_size=60,
                                             hard_vocab_limit=False, num_threads=1, minloglevel=2,
                                             character_coverage=1.0, **ids)
    return buf.getvalue()


def test_xlmr_ordered_sentencepiece_is_used_as_is():
    import sentencepiece

    from harness.synthetic.jina import tokenizer_model_bytes

    data = tokenizer_model_bytes()
    tok = TOK.JinaTokenizer(TOK.TokenizerSource(TOK.SPIECE, data, "test"))
    sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    text = "<character_1> <n>miku</n> 1girl"
    assert tok(text)["input_ids"] == [0] + sp.encode(text) + [2]
    assert tok("")["input_ids"] == [0, 2]
    assert tok.get_vocab()["<pad>"] == 1


def test_fairseq_ordered_sentencepiece_is_shifted_like_xlm_roberta():
    import sentencepiece

    data = spiece(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    tok = TOK.JinaTokenizer(TOK.TokenizerSource(TOK.SPIECE, data, "sentencepiece.bpe.model"))
    ids = tok("a cat Ω")["input_ids"]  # Ω was never seen: SentencePiece's unk 0 -> <unk> 3
    raw = sp.encode("a cat Ω")
    assert ids == [0] + [i + 1 if i >= 3 else 3 for i in raw] + [2] and 3 in ids
    vocab = tok.get_vocab()
    assert vocab["<s>"] == 0 and vocab["<pad>"] == 1 and vocab[sp.id_to_piece(raw[0])] == raw[0] + 1


def tokenizer_json(specials=("<s>", "<pad>", "</s>", "<unk>")) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=80, special_tokens=list(specials), unk_token=specials[-1])
    tok.train_from_iterator(["1girl, solo, aqua hair, twintails", "a cat on a wooden table"] * 20, trainer)
    return tok.to_str()


def test_tokenizer_json_gives_the_same_ids_as_the_tokenizers_package():
    from tokenizers import Tokenizer

    text = tokenizer_json()
    tok = TOK.JinaTokenizer(TOK.TokenizerSource(TOK.TOKENIZER_JSON, text, "tokenizer.json"))
    ref = Tokenizer.from_str(text).encode("a cat, aqua hair", add_special_tokens=False).ids
    assert tok("a cat, aqua hair")["input_ids"] == [0] + ref + [2]


def test_a_tokenizer_of_another_model_is_refused():
    with pytest.raises(TOK.TokenizerError, match="tokenizer.json: ids of <s> <pad> </s> <unk> are"):
        TOK.JinaTokenizer(TOK.TokenizerSource(TOK.TOKENIZER_JSON, tokenizer_json(("[CLS]", "[PAD]", "[UNK]")),
                                              "tokenizer.json"))
    gemma_like = spiece(pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    with pytest.raises(TOK.TokenizerError, match="spm: SentencePiece special ids .* not Jina CLIP v2"):
        TOK.JinaTokenizer(TOK.TokenizerSource(TOK.SPIECE, gemma_like, "spm"))
    with pytest.raises(TOK.TokenizerError, match="junk is not a SentencePiece model"):
        TOK.JinaTokenizer(TOK.TokenizerSource(TOK.SPIECE, b"not a model", "junk"))


@pytest.mark.parametrize("module", ["jina_clip_v2", "newbie_jina_tokenizer"])
def test_docstring_examples(module):
    result = doctest.testmod(pure(module))
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- file layouts (nodes/newbie_te_files.py)

@pytest.fixture(scope="module")
def tiny_jina(tmp_path_factory):
    from harness.synthetic import cache

    return cache.ensure("jina-clip-v2", "tiny", tmp_path_factory.mktemp("models"))


def hf_jina(tmp_path, repack, tasks=2, with_config=True):
    """The repack in jina-clip-v2's HF layout, LoRA adapters on Wqkv and the word embeddings."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    with safe_open(str(repack), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    tok = sd.pop("spiece_model")
    out, lora = {}, {}
    for k, v in sd.items():
        k = "text_model.transformer." + k[len("model."):]
        if k.endswith(("layers.0.mixer.Wqkv.weight", "word_embeddings.weight")):
            layer = k[: -len(".weight")]
            out[layer + ".parametrizations.weight.original"] = v
            emb = "embeddings" in k
            a = torch.randn((tasks, v.shape[0], 4) if emb else (tasks, 4, v.shape[1]), generator=g) * 0.05
            b = torch.randn((tasks, 4, v.shape[1]) if emb else (tasks, v.shape[0], 4), generator=g) * 0.05
            out[layer + ".parametrizations.weight.0.lora_A"], out[layer + ".parametrizations.weight.0.lora_B"] = a, b
            lora[layer] = (v.float(), a, b, emb)
        else:
            out[k] = v
    (tmp_path / "sentencepiece.bpe.model").write_bytes(tok.numpy().tobytes())
    if with_config:
        conf = {"text_config": {"default_lora_task": "retrieval.query", "hf_model_config_kwargs": {
            "lora_adaptations": ["retrieval.passage", "retrieval.query"][-tasks:], "lora_alpha": 4}}}
        (tmp_path / "config.json").write_text(json.dumps(conf))
    path = tmp_path / "model.safetensors"
    save_file(out, str(path))
    return path, lora


def test_hf_layout_merges_the_default_lora_adapter(tmp_path, tiny_jina):
    files = pure("newbie_te_files")
    path, lora = hf_jina(tmp_path, tiny_jina, tasks=2)
    f = files.read_jina(str(path))
    assert f.layout.startswith("HF") and f.tokenizer.kind == TOK.SPIECE and f.notes
    for layer, (w, a, b, emb) in lora.items():
        i = 1  # retrieval.query is the second adaptation in this config.json
        delta = a[i] @ b[i] if emb else b[i] @ a[i]
        want = (w + delta * (4 / 4)).to(torch.bfloat16)
        key = "model." + layer[len("text_model.transformer."):] + ".weight"
        assert torch.equal(f.state_dict[key], want), key
    assert not any("parametrizations" in k for k in f.state_dict)


def test_lora_without_a_config_is_merged_only_when_unambiguous(tmp_path, tiny_jina):
    files = pure("newbie_te_files")
    one, _ = hf_jina(tmp_path, tiny_jina, tasks=1, with_config=False)
    assert "jina-clip-v2 defaults" in files.read_jina(str(one)).notes[0]
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    two, _ = hf_jina(two_dir, tiny_jina, tasks=2, with_config=False)
    with pytest.raises(files.TextEncoderFileError, match="2 LoRA adaptations.*config.json"):
        files.read_jina(str(two))


def test_fp8_jina_quantizes_the_encoder_linears_per_channel(tiny_jina):
    files = pure("newbie_te_files")
    quant = importlib.import_module("lowvram_pure.quant")
    bf16, fp8 = files.read_jina(str(tiny_jina)), files.read_jina(str(tiny_jina), quant.QuantConfig())
    key = "model.encoder.layers.1.mlp.fc1.weight"
    assert fp8.state_dict[key].dtype == torch.float8_e4m3fn
    scale = fp8.state_dict[key[: -len(".weight")] + ".weight_scale"]
    assert scale.shape == (64,)
    assert quant.sqnr_db(bf16.state_dict[key].float(), quant.dequantize(fp8.state_dict[key], scale)) > 25
    assert fp8.state_dict["model.embeddings.word_embeddings.weight"].dtype == torch.bfloat16


def test_tokenizer_from_the_newbie_nodes_metadata(tmp_path, tiny_jina):
    from safetensors import safe_open

    files = pure("newbie_te_files")
    with safe_open(str(tiny_jina), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k != "spiece_model"}
    meta = {"tokenizer_files": json.dumps({"tokenizer.json": base64.b64encode(tokenizer_json().encode()).decode()})}
    path = tmp_path / "jina_clip_v2.safetensors"
    save_file(sd, str(path), metadata=meta)
    f = files.read_jina(str(path))
    assert f.tokenizer.kind == TOK.TOKENIZER_JSON and "in jina_clip_v2.safetensors" in f.tokenizer.origin


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model.", "language_model."])
def test_gemma_from_hugging_face_layouts_reads_like_the_repack(tmp_path, prefix):
    from safetensors import safe_open

    from harness.synthetic import cache

    files = pure("newbie_te_files")
    repack = cache.ensure("gemma3-4b", "tiny", tmp_path / "models")
    with safe_open(str(repack), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    tokenizer = sd.pop("spiece_model").numpy().tobytes()
    hf = {prefix + k[len("model."):]: v for k, v in sd.items()}
    hf["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(4, 4)
    hf[prefix + "layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # a buffer some converters save
    meta = {"tokenizer_files": json.dumps({"tokenizer.model": base64.b64encode(tokenizer).decode()})}
    path = tmp_path / "gemma3_4b_text_encoder.safetensors"
    save_file(hf, str(path), metadata=meta)
    ref, got = files.read_gemma(str(repack)), files.read_gemma(str(path))
    assert set(got.state_dict) == set(ref.state_dict) and got.config == ref.config
    assert all(torch.equal(got.state_dict[k], ref.state_dict[k]) for k in ref.state_dict)
    assert got.tokenizer.data == tokenizer and "tokenizer.model in" in got.tokenizer.origin


def test_synthetic_jina_docstring_examples():
    import harness.synthetic.jina as synthetic_jina

    result = doctest.testmod(synthetic_jina)
    assert result.attempted > 0 and result.failed == 0
