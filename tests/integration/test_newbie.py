"""NewBie-image through the pack on ComfyUI 0.3.75 (CPU, tiny synthetic models): the DiT loads completely
through Float8DiTLoader and NewBieDiTLoader, the Jina pooled vector reaches every adaLN per cond/uncond,
both text encoders load from the files users have, mix-ups fail clearly, and a headless server runs the
shipped NewBie workflow end to end."""
from __future__ import annotations

import importlib
import json
import logging
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytestmark = pytest.mark.comfy
JINA_KEYS = ("clip_text_pooled_proj.0.weight", "clip_text_pooled_proj.1.weight", "clip_text_pooled_proj.1.bias",
             "time_text_embed.1.weight", "time_text_embed.1.bias")


@pytest.fixture(scope="module")
def pack(comfy):
    from harness.pack_import import import_pack

    import_pack()
    names = ("comfy_newbie_dit", "comfy_newbie_text", "comfy_fp8_loading", "newbie_text_encode", "newbie_te_files")
    return {n: importlib.import_module(f"lowvram_kit.nodes.{n}") for n in names}


@pytest.fixture(scope="module")
def files(tiny_model):
    return {n: str(tiny_model(n)) for n in ("newbie", "gemma3-4b", "jina-clip-v2", "clip-l")}


@pytest.fixture(scope="module")
def clip(pack, files):
    te = pack["comfy_newbie_text"]
    return te.load_newbie_text_encoders(files["gemma3-4b"], files["jina-clip-v2"], te.NewBieTEConfig())


@pytest.fixture(scope="module")
def newbie_bf16(pack, files):
    return pack["comfy_newbie_dit"].load_newbie_dit(files["newbie"], torch.bfloat16)


def file_tensors(path, keys):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in keys}


def logged_load_problems(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "unet unexpected" in r.getMessage() or "unet missing" in r.getMessage()]


# ---------------------------------------------------------------- the DiT: every weight, both routes

def test_float8_route_loads_every_jina_path_weight(pack, files, caplog):
    from lowvram_kit.quant import QuantConfig

    fp8 = pack["comfy_fp8_loading"]
    with caplog.at_level(logging.INFO):
        model, report = fp8.load_fp8_model(files["newbie"], fp8.Fp8LoadConfig(QuantConfig()))
    assert report.family == "newbie" and logged_load_problems(caplog) == []
    dm = model.model.diffusion_model
    with safe_open(files["newbie"], "pt") as f:
        file_keys = set(f.keys())
    module_keys = {k for k in dm.state_dict() if not k.endswith(".weight_scale")}
    assert module_keys == file_keys, "the module and the file must hold the same weights, none dropped"
    want = file_tensors(files["newbie"], JINA_KEYS)
    got = dict(dm.named_parameters())
    for k in JINA_KEYS:
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]), k
    assert any(k.startswith("diffusion_model.time_text_embed.") for k in model.model.state_dict())  # LoRA-visible


def test_bf16_route_loads_completely_and_counts_the_pooled_path(newbie_bf16, files, caplog):
    dm = newbie_bf16.model.diffusion_model
    with safe_open(files["newbie"], "pt") as f:
        assert set(dm.state_dict()) == set(f.keys())
    params = dict(dm.named_parameters())
    for k, t in file_tensors(files["newbie"], JINA_KEYS).items():
        assert torch.equal(params[k], t), k
    jina_bytes = sum(t.numel() * t.element_size() for t in file_tensors(files["newbie"], JINA_KEYS).values())
    total = sum(t.numel() * t.element_size() for t in dm.state_dict().values())
    assert newbie_bf16.model_size() >= total >= jina_bytes > 0


def forward(model, pooled, ctx, x=None, t=0.6):
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)) if x is None else x
    kw = {} if pooled is None else {"clip_text_pooled": pooled}
    with torch.no_grad():
        return model.model.apply_model(x, torch.full((x.shape[0],), t), c_crossattn=ctx, num_tokens=ctx.shape[1],
                                       transformer_options={"wrappers": model.wrappers}, **kw).float()


def test_the_pooled_vector_reaches_the_model_row_by_row(newbie_bf16):
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 6, 2560, generator=g)
    p1, p2 = torch.randn(1, 1024, generator=g), torch.randn(1, 1024, generator=g)
    out1, out2, out_none = forward(newbie_bf16, p1, ctx), forward(newbie_bf16, p2, ctx), forward(newbie_bf16, None, ctx)
    assert (out1 - out2).abs().max() > 1e-3 and (out1 - out_none).abs().max() > 1e-3
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    both = forward(newbie_bf16, torch.cat([p1, p2]), ctx.repeat(2, 1, 1), x.repeat(2, 1, 1, 1))
    torch.testing.assert_close(both[0:1], out1, atol=2e-2, rtol=0)
    torch.testing.assert_close(both[1:2], out2, atol=2e-2, rtol=0)
    # Outside a forward no vector is held: a later call without one sees zeros, not the last vector.
    torch.testing.assert_close(forward(newbie_bf16, None, ctx), out_none, atol=0, rtol=0)


def test_the_pooled_vector_passes_in_and_out_of_inference_mode(newbie_bf16):
    # PooledPath keeps one buffer for the pooled vector (a CUDA graph replay reads its address); a buffer made in
    # inference mode (ComfyUI's sampling) takes no in-place copy outside it, so a later call there makes another.
    g = torch.Generator().manual_seed(3)
    ctx, pooled = torch.randn(1, 6, 2560, generator=g), torch.randn(1, 1024, generator=g)
    with torch.inference_mode():
        inside = forward(newbie_bf16, pooled, ctx)
    outside = forward(newbie_bf16, pooled, ctx)
    torch.testing.assert_close(inside, outside, atol=0, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(forward(newbie_bf16, pooled, ctx), inside, atol=0, rtol=0)


def test_sampling_batches_cond_and_uncond_with_their_own_pooled_vectors(newbie_bf16):
    import comfy.sample

    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(1, 6, 2560, generator=g)
    pos = [[ctx, {"pooled_output": torch.randn(1, 1024, generator=g)}]]
    neg = [[ctx, {"pooled_output": torch.randn(1, 1024, generator=g)}]]
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(1, 16, 8, 8, generator=g)

    def run(positive, negative):
        model = newbie_bf16.clone()
        seen, calls = {}, []

        def cfg(args):
            seen.setdefault("cond", args["cond_denoised"].clone())
            seen.setdefault("uncond", args["uncond_denoised"].clone())
            return args["uncond_denoised"] + 4.5 * (args["cond_denoised"] - args["uncond_denoised"])

        def count(executor, x, *a, **kw):
            calls.append(x.shape[0])
            return executor(x, *a, **kw)

        model.set_model_sampler_cfg_function(cfg)
        model.add_wrapper_with_key("diffusion_model", "test_count", count)
        comfy.sample.sample(model, noise, 1, 4.5, "euler", "simple", positive, negative, latent, disable_pbar=True)
        return seen, calls

    mixed, calls = run(pos, neg)
    assert calls == [2], "cond and uncond should run as one batch of two"
    only_pos, _ = run(pos, pos)
    only_neg, _ = run(neg, neg)
    torch.testing.assert_close(mixed["cond"], only_pos["cond"], atol=2e-2, rtol=0)
    torch.testing.assert_close(mixed["uncond"], only_neg["uncond"], atol=2e-2, rtol=0)
    assert (mixed["cond"] - mixed["uncond"]).abs().max() > 1e-3


# ---------------------------------------------------------------- the text encoders

def test_text_encoders_give_gemma_features_and_the_jina_pooled_vector(pack, clip):
    enc = pack["newbie_text_encode"].NewBieTextEncode()
    (cond,) = enc.encode(clip, "<character_1><n>miku</n></character_1>", "high_quality")
    feats, extra = cond[0]
    assert feats.shape[-1] == 2560 and extra["pooled_output"].shape == (1, 1024)
    assert extra["attention_mask"].shape == feats.shape[:2]
    # Jina reads the caption only: the system prompt changes Gemma's features, not the pooled vector.
    (plain,) = enc.encode(clip, "<character_1><n>miku</n></character_1>", "none")
    assert plain[0][0].shape[1] < feats.shape[1]
    torch.testing.assert_close(plain[0][1]["pooled_output"], extra["pooled_output"], atol=0, rtol=0)
    (other,) = enc.encode(clip, "a red car", "none")
    assert (other[0][1]["pooled_output"] - extra["pooled_output"]).abs().max() > 1e-4


def test_every_text_encoder_weight_is_loaded(clip, files):
    model = clip.cond_stage_model
    for part, name in (("gemma", "gemma3-4b"), ("jina", "jina-clip-v2")):
        with safe_open(files[name], "pt") as f:
            file_keys = {k for k in f.keys() if k != "spiece_model"}
        module = getattr(model, part).transformer
        assert set(module.state_dict()) == file_keys, part


def test_fp8_text_encoders_stay_close_to_bf16(pack, clip, files):
    te = pack["comfy_newbie_text"]
    fp8 = te.load_newbie_text_encoders(files["gemma3-4b"], files["jina-clip-v2"], te.NewBieTEConfig(weight_format="fp8"))
    jina = fp8.cond_stage_model.jina.transformer.model
    assert jina.encoder.layers[0].mixer.Wqkv.weight.dtype == torch.float8_e4m3fn
    assert jina.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    text = "<character_1><n>miku</n><appearance>aqua hair</appearance></character_1>"
    ref, got = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True), \
        fp8.encode_from_tokens(fp8.tokenize(text), return_pooled=True)
    from lowvram_kit.quant import sqnr_db

    assert sqnr_db(ref[1], got[1]) > 20 and sqnr_db(ref[0], got[0]) > 20


def test_device_cpu_keeps_both_encoders_on_the_cpu(pack, files):
    te = pack["comfy_newbie_text"]
    c = te.load_newbie_text_encoders(files["gemma3-4b"], files["jina-clip-v2"], te.NewBieTEConfig(device="cpu"))
    assert c.patcher.load_device.type == "cpu" and c.patcher.offload_device.type == "cpu"


class _EmbeddingElsewhere(torch.nn.Module):
    """The real embedding, but its `weight` reports another device: what SDClipModel.forward sees in ComfyUI
    0.3.75 after a partial load left the (largest) embedding table on the offload device."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def weight(self):
        return torch.empty(self.inner.weight.shape, device="meta")

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_encoders_run_on_the_load_device_when_the_embedding_table_is_elsewhere(pack, files, monkeypatch):
    te = pack["comfy_newbie_text"]
    c = te.load_newbie_text_encoders(files["gemma3-4b"], files["jina-clip-v2"], te.NewBieTEConfig())
    text = "<character_1><n>miku</n></character_1>"
    ref = c.encode_from_tokens(c.tokenize(text), return_pooled=True)
    for part in (c.cond_stage_model.gemma, c.cond_stage_model.jina):
        moved = _EmbeddingElsewhere(part.transformer.get_input_embeddings())
        monkeypatch.setattr(part.transformer, "get_input_embeddings", lambda moved=moved: moved)
    got = c.encode_from_tokens(c.tokenize(text), return_pooled=True)  # on "meta" without the mixin: no values
    assert got[0].device == c.patcher.load_device and got[1].device == c.patcher.load_device
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=0, rtol=0)


def test_nf4_without_bitsandbytes_says_how_to_install_it(pack, files, monkeypatch):
    import sys

    te = pack["comfy_newbie_text"]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(RuntimeError, match="pip install bitsandbytes.*fp8"):
        te.load_newbie_text_encoders(files["gemma3-4b"], files["jina-clip-v2"], te.NewBieTEConfig(weight_format="nf4"))


def test_nf4_with_bitsandbytes_when_installed(pack, clip, files):
    pytest.importorskip("bitsandbytes")
    te = pack["comfy_newbie_text"]
    nf4 = te.load_newbie_text_encoders(files["gemma3-4b"], files["jina-clip-v2"], te.NewBieTEConfig(weight_format="nf4"))
    assert nf4.cond_stage_model.jina.transformer.model.encoder.layers[0].mixer.Wqkv.weight.dtype == torch.uint8
    text = "a red car"
    from lowvram_kit.quant import sqnr_db

    ref, got = clip.encode_from_tokens(clip.tokenize(text), True), nf4.encode_from_tokens(nf4.tokenize(text), True)
    assert sqnr_db(ref[1], got[1]) > 10


def hf_copies(tmp_path, files):
    """The tiny repacks rewritten in Hugging Face layouts, tokenizers beside them."""
    gemma_dir, jina_dir = tmp_path / "gemma-3-4b-it", tmp_path / "jina-clip-v2"
    gemma_dir.mkdir()
    jina_dir.mkdir()
    with safe_open(files["gemma3-4b"], "pt") as f:
        gemma = {k: f.get_tensor(k) for k in f.keys()}
    (gemma_dir / "tokenizer.model").write_bytes(gemma.pop("spiece_model").numpy().tobytes())
    hf = {"language_model." + k: v for k, v in gemma.items()}
    hf["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(8, 4, dtype=torch.bfloat16)
    keys = sorted(hf)
    save_file({k: hf[k] for k in keys[: len(keys) // 2]}, gemma_dir / "model-00001-of-00002.safetensors")
    save_file({k: hf[k] for k in keys[len(keys) // 2:]}, gemma_dir / "model-00002-of-00002.safetensors")
    with safe_open(files["jina-clip-v2"], "pt") as f:
        jina = {k: f.get_tensor(k) for k in f.keys() if k != "spiece_model"}
    hf = {}
    for k, v in jina.items():
        k = "text_model.transformer.roberta." + k[len("model."):]
        if k.endswith("Wqkv.weight"):  # a LoRA parametrization whose B is zero: merging changes nothing
            layer = k[: -len(".weight")]
            hf[layer + ".parametrizations.weight.original"] = v
            hf[layer + ".parametrizations.weight.0.lora_A"] = torch.randn(1, 4, v.shape[1]).to(v.dtype)
            hf[layer + ".parametrizations.weight.0.lora_B"] = torch.zeros(1, v.shape[0], 4, dtype=v.dtype)
        else:
            hf[k] = v
    hf["vision_model.blocks.0.mlp.fc1.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(hf, jina_dir / "model.safetensors")
    return gemma_dir / "model-00001-of-00002.safetensors", jina_dir / "model.safetensors"


def test_hugging_face_layouts_encode_like_the_repacks(pack, clip, files, tmp_path):
    from harness.synthetic import jina as synthetic_jina

    te = pack["comfy_newbie_text"]
    gemma_hf, jina_hf = hf_copies(tmp_path, files)
    # jina's tokenizer as the repack has it, under the HF repo's file name for the SentencePiece model
    (jina_hf.parent / "sentencepiece.bpe.model").write_bytes(synthetic_jina.tokenizer_model_bytes())
    hf_clip = te.load_newbie_text_encoders(str(gemma_hf), str(jina_hf), te.NewBieTEConfig())
    text = "<general_tags><style>anime</style></general_tags>"
    ref = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    got = hf_clip.encode_from_tokens(hf_clip.tokenize(text), return_pooled=True)
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=0, rtol=0)


# ---------------------------------------------------------------- mix-ups and bad files

def sparse_lumina2(path):
    from harness.synthetic import nextdit
    from harness.synthetic.writer import write_sparse

    cfg = nextdit.NextDiTConfig(dim=2304, n_layers=0, n_heads=24, n_kv_heads=8, ffn_hidden=9216, cap_feat_dim=2304,
                                adaln_dim=1024)
    write_sparse(path, nextdit.nextdit_specs(cfg), {"format": "pt"})
    return str(path)


def test_a_lumina2_file_given_as_newbie_is_refused(pack, tmp_path):
    lumina = sparse_lumina2(tmp_path / "lumina_2_model_bf16.safetensors")
    with pytest.raises(ValueError, match="Lumina-Image-2.0.*not NewBie-image"):
        pack["comfy_newbie_dit"].load_newbie_dit(lumina)


def test_newbie_conditioning_on_lumina2_and_lumina2_conditioning_on_newbie_are_named(comfy, pack, tmp_path, newbie_bf16):
    dit = pack["comfy_newbie_dit"]
    lumina_path = sparse_lumina2(tmp_path / "lumina.safetensors")
    lumina = comfy.sd.load_diffusion_model(lumina_path, model_options={"dtype": torch.bfloat16})
    lumina = dit.attach(lumina, {}, "lumina2", lumina_path)  # what Float8DiTLoader's family hook does
    with pytest.raises(ValueError, match="2560-d text features.*lumina2.*2304-d.*CLIPTextEncodeLumina2"):
        forward(lumina, None, torch.randn(1, 4, 2560))
    with pytest.raises(ValueError, match="2304-d text features \\(Gemma-2-2B.*NewBieTextEncoderLoader"):
        forward(newbie_bf16, None, torch.randn(1, 4, 2304))


def test_a_pooled_vector_of_the_wrong_width_is_named(newbie_bf16):
    import comfy.sample

    cond = [[torch.randn(1, 4, 2560), {"pooled_output": torch.randn(1, 768)}]]
    with pytest.raises(ValueError, match="pooled vector has 768 values.*1024"):
        comfy.sample.sample(newbie_bf16.clone(), torch.randn(1, 16, 8, 8), 1, 4.0, "euler", "simple", cond, cond,
                            torch.zeros(1, 16, 8, 8), disable_pbar=True)


@pytest.mark.parametrize("slot, other, message", [
    ("gemma", "jina-clip-v2", "gemma_name: jina_clip_v2_bf16.safetensors is Jina CLIP v2.*belongs in jina_name"),
    ("jina", "gemma3-4b", "jina_name: gemma_3_4b_it_bf16.safetensors is Gemma-3.*belongs in gemma_name"),
    ("jina", "clip-l", "jina_name: clip_l.safetensors is a CLIP text encoder"),
])
def test_a_text_encoder_of_the_wrong_model_is_named(pack, files, slot, other, message):
    te = pack["comfy_newbie_text"]
    paths = {"gemma": files["gemma3-4b"], "jina": files["jina-clip-v2"], slot: files[other]}
    with pytest.raises(ValueError, match=message):
        te.load_newbie_text_encoders(paths["gemma"], paths["jina"], te.NewBieTEConfig())


def test_lumina2s_gemma2_is_named_in_the_gemma_slot(pack, files, tmp_path):
    te = pack["comfy_newbie_text"]
    gemma2 = tmp_path / "gemma_2_2b_fp16.safetensors"
    save_file({"model.layers.0.post_feedforward_layernorm.weight": torch.ones(4),
               "model.embed_tokens.weight": torch.zeros(8, 4)}, gemma2)
    with pytest.raises(ValueError, match="Gemma-2-2B \\(Lumina-Image-2.0's text encoder\\), not Gemma-3"):
        te.load_newbie_text_encoders(str(gemma2), files["jina-clip-v2"], te.NewBieTEConfig())


def test_a_missing_tokenizer_names_the_file_and_the_fix(pack, files, tmp_path):
    te = pack["comfy_newbie_text"]
    gemma_hf, jina_hf = hf_copies(tmp_path, files)
    with pytest.raises(ValueError, match="model.safetensors carries no tokenizer.*tokenizer.json.*beside it"):
        te.load_newbie_text_encoders(str(gemma_hf), str(jina_hf), te.NewBieTEConfig())
    (gemma_hf.parent / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors carries no tokenizer.*tokenizer.model"):
        te.load_newbie_text_encoders(str(gemma_hf), files["jina-clip-v2"], te.NewBieTEConfig())


def test_a_missing_shard_is_named(pack, files, tmp_path):
    te = pack["comfy_newbie_text"]
    gemma_hf, _ = hf_copies(tmp_path, files)
    (gemma_hf.parent / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="shard 00001 of 2.*model-00002-of-00002.safetensors is missing"):
        te.load_newbie_text_encoders(str(gemma_hf), files["jina-clip-v2"], te.NewBieTEConfig())


# ---------------------------------------------------------------- the whole graph in a headless server

@pytest.mark.server
def test_headless_server_runs_the_shipped_newbie_workflow(files, synthetic_dir, tiny_model, tmp_path):
    from harness.paths import REPO_ROOT
    from harness.server import ComfyServer, ServerConfig
    from harness.workflow_api import ui_to_api

    tiny_model("flux-ae")
    ui = json.loads((REPO_ROOT / "workflows" / "newbie_16gb.json").read_text())
    with ComfyServer(ServerConfig(base_dir=tmp_path / "base", models_dirs=(synthetic_dir,))) as server:
        api = ui_to_api(ui, server.object_info())
        types = {n["class_type"] for n in api.values()}
        assert {"NewBieXMLPrompt", "NewBieTextEncoderLoader", "NewBieTextEncode", "Float8DiTLoader",
                "VAEDecode", "SaveImage"} <= types
        for node in api.values():
            for key, value in {"steps": 2, "width": 64, "height": 64}.items():
                if key in node["inputs"]:
                    node["inputs"][key] = value
        entry = server.wait(server.queue(api), timeout_s=600)
        log = server.log_path.read_text()
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images and (tmp_path / "base" / "output" / images[0]["subfolder"] / images[0]["filename"]).stat().st_size > 100
    assert "unet unexpected" not in log and "unet missing" not in log
    assert "NewBieTextEncoderLoader: gemma" in log and "Float8DiTLoader: newbie" in log
    assert re.search(r"NewBieTextEncode: [0-9.]+ s on cpu; [0-9.]+ of [0-9.]+ GiB of the encoders loaded there", log)


# ---------------------------------------------------------------- newer ComfyUI: defer to its own NewBie support

def test_with_native_newbie_support_the_file_is_left_to_comfyui(pack, files, newbie_bf16, monkeypatch):
    dit = pack["comfy_newbie_dit"]
    monkeypatch.setattr(dit, "native_newbie_dit", lambda: True)
    sd = {k: torch.zeros(1) for k in JINA_KEYS}
    assert dit.take_extra_weights(sd, "newbie", files["newbie"]) == {} and set(sd) == set(JINA_KEYS)
    assert dit.attach(newbie_bf16.clone(), {}, "newbie", files["newbie"]) is not None  # has the modules: fine
    plain = newbie_bf16.clone()
    plain.model = type("M", (), {"diffusion_model": torch.nn.Module()})()
    with pytest.raises(ValueError, match="without its pooled path"):
        dit.attach(plain, {}, "newbie", files["newbie"])


def test_with_native_newbie_text_encoders_the_repacks_go_to_comfyui(pack, files, monkeypatch):
    from types import SimpleNamespace

    import comfy.sd

    te = pack["comfy_newbie_text"]
    calls = []
    monkeypatch.setattr(te, "native_newbie_text", lambda: True)
    monkeypatch.setattr(comfy.sd, "CLIPType", SimpleNamespace(NEWBIE="newbie"))
    monkeypatch.setattr(comfy.sd, "load_clip", lambda paths, *a, **kw: calls.append((paths, kw["clip_type"])) or "native")
    assert te.load_newbie_text_encoders(files["gemma3-4b"], files["jina-clip-v2"], te.NewBieTEConfig()) == "native"
    assert calls == [([files["gemma3-4b"], files["jina-clip-v2"]], "newbie")]
    fp8 = te.load_newbie_text_encoders(files["gemma3-4b"], files["jina-clip-v2"], te.NewBieTEConfig(weight_format="fp8"))
    assert fp8 != "native" and len(calls) == 1  # fp8 / NF4 / CPU stay with the pack


def test_float8_route_with_the_pooled_path_quantized_too(pack, files, newbie_bf16):
    from lowvram_kit.quant import QuantConfig

    fp8 = pack["comfy_fp8_loading"]
    model, _ = fp8.load_fp8_model(files["newbie"], fp8.Fp8LoadConfig(QuantConfig(), high_precision_layers="none"))
    dm = model.model.diffusion_model
    assert dm.time_text_embed[1].weight.dtype == torch.float8_e4m3fn and dm.time_text_embed[1].weight_scale is not None
    g = torch.Generator().manual_seed(3)
    ctx, pooled = torch.randn(1, 6, 2560, generator=g), torch.randn(1, 1024, generator=g)
    from lowvram_kit.quant import sqnr_db

    assert sqnr_db(forward(newbie_bf16, pooled, ctx), forward(model, pooled, ctx)) > 15
