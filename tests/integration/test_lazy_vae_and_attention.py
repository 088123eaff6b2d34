"""LazyVAEDecode and FlashAttnToggle inside ComfyUI 0.3.75 on the CPU: in-process against ComfyUI's own
VAE and model classes, then as API graphs in a real headless server, then the GPU bench in smoke mode.

Synthetic weights are random, so a decoded "image" is noise; the tolerances below are for that noise
(a trained VAE, whose output is smooth, differs far less between tiles).
"""
from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from harness.server import ComfyServer, ServerConfig, ServerError

pytestmark = pytest.mark.comfy
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pack(comfy):
    from harness.pack_import import import_pack

    import_pack()
    return SimpleNamespace(**{n: importlib.import_module(f"lowvram_kit.nodes.{m}") for n, m in (
        ("vae", "_vae_comfy"), ("tiling", "_tiling"), ("attn", "_attention_backends"),
        ("attn_comfy", "_attention_comfy"), ("decode_node", "lazy_vae_decode"), ("toggle", "flash_attn_toggle"))})


@pytest.fixture(scope="module")
def vaes(comfy, tiny_model):
    return {n: comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny_model(n)))) for n in ("flux-ae", "sdxl-vae")}


def latent(c, h, w, b=1, seed=0):
    return {"samples": torch.randn((b, c, h, w), generator=torch.Generator().manual_seed(seed))}


def loaded(comfy, vae) -> bool:
    return vae.patcher in comfy.model_management.loaded_models()


def decode(pack, vae, samples, **settings):
    policy = settings.pop("policy", pack.tiling.TilingPolicy())
    with torch.no_grad():
        return pack.vae.decode_lazily(vae, samples, pack.vae.DecodeSettings(**settings), policy)


# ---- LazyVAEDecode in-process ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["flux-ae", "sdxl-vae"])
def test_untiled_equals_comfyui_decode_for_a_batch(pack, vaes, name):
    vae = vaes[name]
    s = latent(vae.latent_channels, 8, 12, b=2)
    with torch.no_grad():
        ref = vae.decode(s["samples"])
    image, plan = decode(pack, vae, s, tiling="never")
    assert image.shape == ref.shape == (2, 64, 96, 3) and not plan.tiled
    assert torch.equal(image, ref.float())


def test_tiled_matches_untiled_within_tolerance_and_overlap_matters(pack, vaes):
    # Flux AE, 128x192 px in 3 tiles of 128 px with 32 px overlap. Measured on the synthetic (random)
    # weights: mean |diff| 0.03, max 0.29 (0..1 images). Without overlap the max error is ~3x larger.
    vae = vaes["flux-ae"]
    s = latent(16, 16, 24, seed=3)
    with torch.no_grad():
        ref = vae.decode(s["samples"]).float()
    tiled, plan = decode(pack, vae, s, tiling="always", tile_size=128, overlap=32)
    hard, plan0 = decode(pack, vae, s, tiling="always", tile_size=128, overlap=0)
    assert plan.tiled and plan.n_tiles == 2 and plan0.n_tiles == 2, (plan.describe(), plan0.describe())
    err, err0 = (tiled - ref).abs(), (hard - ref).abs()
    assert float(err.mean()) < 0.05 and float(err.max()) < 0.4
    assert float(err0.max()) > 1.5 * float(err.max())


def test_auto_plans_from_comfyui_estimate_and_free_memory(pack, vaes, comfy):
    vae = vaes["flux-ae"]             # on the CPU: fp32, free memory = available host RAM
    settings = pack.vae.DecodeSettings("auto")
    small = pack.vae.build_request(vae, latent(16, 32, 32)["samples"], settings)
    assert small.bytes_per_out_px == pytest.approx(2178 * 4) and small.weight_bytes == 0
    assert small.free_bytes == pytest.approx(comfy.model_management.get_free_memory(vae.device), rel=0.2)
    assert not pack.tiling.plan_decode(small).tiled                       # 256x256: ~0.5 GiB
    large = pack.vae.build_request(vae, latent(16, 128, 128)["samples"], settings)
    plan = pack.tiling.plan_decode(large)                                 # 1024x1024: ~8.5 GiB in fp32
    assert plan.tiled and plan.est_call_bytes <= pack.tiling.TilingPolicy().activation_cap_bytes
    tiny_free = pack.tiling.plan_decode(pack.tiling.replace(small, free_bytes=300 << 20))
    assert tiny_free.tiled and tiny_free.est_call_bytes <= 300 << 20


def test_oom_in_comfyui_retries_with_smaller_tiles(pack, vaes, comfy, monkeypatch, caplog):
    vae = vaes["sdxl-vae"]
    real = vae.first_stage_model.decode

    def decode_or_oom(z, **kw):
        if z.shape[-1] * z.shape[-2] > 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (simulated)")
        return real(z, **kw)

    s = latent(4, 12, 12, seed=4)
    with torch.no_grad():
        ref = vae.decode(s["samples"]).float()
    monkeypatch.setattr(vae.first_stage_model, "decode", decode_or_oom)
    with caplog.at_level(logging.WARNING, logger="lowvram"):
        image, plan = decode(pack, vae, s)
    assert image.shape == (1, 96, 96, 3) and plan.tiled and max(plan.tile_hw) <= 8
    assert any("retrying with" in r.message for r in caplog.records)
    # the SDXL VAE in 8-latent-px tiles (the smallest) on random weights: still close on average
    assert float((image - ref).abs().mean()) < 0.08
    # untiled on a CPU device: nowhere left to go; a clear error and the VAE is back off the device
    with pytest.raises(MemoryError, match="smaller image"):
        decode(pack, vae, latent(4, 16, 16), tiling="never")
    assert not loaded(comfy, vae)


def test_offload_after_decode(pack, vaes, comfy):
    vae = vaes["sdxl-vae"]
    comfy.model_management.unload_all_models()
    decode(pack, vae, latent(4, 8, 8), offload_after_decode=False)
    assert loaded(comfy, vae)
    decode(pack, vae, latent(4, 8, 8), offload_after_decode=True)
    assert not loaded(comfy, vae)


@pytest.mark.parametrize("bad,match", [
    (latent(4, 8, 8), "has 4 channels but this VAE takes 16"),
    (latent(16, 8, 8, b=0), "batch is empty"),
    ({"samples": torch.zeros(1, 16, 2, 8, 8)}, "5-D latent"),
    ({"wrong": 1}, "must be a LATENT"),
])
def test_bad_inputs_are_named_and_nothing_is_loaded(pack, vaes, comfy, bad, match):
    vae = vaes["flux-ae"]
    comfy.model_management.unload_all_models()
    with pytest.raises(ValueError, match=match):
        decode(pack, vae, bad)
    assert not loaded(comfy, vae)


def test_progress_bar_and_cancel(pack, vaes, comfy):
    vae = vaes["sdxl-vae"]
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        _, plan = decode(pack, vae, latent(4, 8, 16), tiling="always", tile_size=64, overlap=16)
        assert plan.n_tiles >= 2 and seen[-1] == (plan.n_tiles, plan.n_tiles) and (0, plan.n_tiles) in seen
        comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            decode(pack, vae, latent(4, 8, 16), tiling="always", tile_size=64)
        assert not loaded(comfy, vae)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)


# ---- FlashAttnToggle in-process -------------------------------------------------------------------------
def _init(module):
    g = torch.Generator().manual_seed(0)
    for p in module.parameters():
        p.data.normal_(0, 0.05, generator=g)
    return module.eval()


def _family(name):
    """A tiny instance of ComfyUI's own model class, its call, and the attention calls one forward makes."""
    import comfy.ops
    ops = comfy.ops.disable_weight_init
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 5, 32, generator=g)
    if name == "flux":
        from comfy.ldm.flux.model import Flux
        m = Flux(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64, mlp_ratio=2.0,
                 num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000, patch_size=2,
                 qkv_bias=True, guidance_embed=False, operations=ops)
        return _init(m), lambda to: m(torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), ctx,
                                      y=torch.randn(1, 32, generator=g), transformer_options=to), 2
    if name == "lumina2":   # NewBie and Z-Image are this class (NextDiT); it passes a caption mask
        from comfy.ldm.lumina.model import NextDiT
        m = NextDiT(patch_size=2, in_channels=16, dim=64, n_layers=1, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
                    multiple_of=16, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[32, 32, 32], qk_norm=True,
                    operations=ops)
        return _init(m), lambda to: m(torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), ctx, 5,
                                      attention_mask=torch.ones(1, 5), transformer_options=to), 3
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel     # SDXL layout, tiny
    m = UNetModel(image_size=None, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                  channel_mult=(1, 2), num_head_channels=16, use_spatial_transformer=True, transformer_depth=[0, 1],
                  transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1, context_dim=32,
                  use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=16, operations=ops)
    return _init(m), lambda to: m(torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.0]), ctx,
                                  y=torch.randn(1, 16, generator=g), transformer_options=to), 8


@pytest.mark.parametrize("family", ["flux", "lumina2", "sdxl"])
def test_each_family_passes_the_override_to_every_attention_call(pack, family):
    A = pack.attn
    functions = pack.attn_comfy.comfy_attention_functions()
    outs = {}
    for backend in ("sdpa_math", "sdpa", "sdpa_flash", "split", "sub_quad"):
        model, run, calls = _family(family)          # same seed: same weights and inputs every time
        A.CALLS.clear()
        with torch.no_grad():
            outs[backend] = run({"optimized_attention_override": A.AttentionOverride(backend, "error", functions)})
        assert A.CALLS == {backend: calls}, (family, backend)
    for backend, out in outs.items():
        assert torch.allclose(out, outs["sdpa_math"], atol=1e-5), (family, backend)


@pytest.fixture(scope="module")
def flux_model(comfy, tiny_model):
    model = comfy.sd.load_diffusion_model(str(tiny_model("flux-dev")))
    yield model
    comfy.model_management.unload_all_models()


def flux_forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ctx, y = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 8, 4096, generator=g), torch.randn(1, 768, generator=g)
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx, y=y, guidance=torch.tensor([3.5]),
                                       transformer_options=model.model_options["transformer_options"]).float()


def test_node_clones_and_backends_agree_on_tiny_flux(pack, flux_model, comfy):
    A, node = pack.attn, pack.toggle.FlashAttnToggle()
    before = dict(flux_model.model_options["transformer_options"])
    math_model = node.apply(flux_model, "sdpa_math", "error")[0]
    sdpa_model = node.apply(flux_model, "sdpa", "error")[0]
    assert math_model is not flux_model and flux_model.model_options["transformer_options"] == before
    assert "optimized_attention_override" not in flux_model.model_options["transformer_options"]
    A.CALLS.clear()
    a, b = flux_forward(math_model), flux_forward(sdpa_model)
    assert A.CALLS == {"sdpa_math": 2, "sdpa": 2}          # 1 double + 1 single block each
    assert (a - b).abs().max() < 1e-3 * a.abs().max()      # bf16 weights on the CPU: rounding only


def test_the_override_reaches_attention_through_comfyui_sampling(pack, flux_model, comfy):
    import comfy.sample
    A = pack.attn
    model = pack.toggle.FlashAttnToggle().apply(flux_model, "sdpa_math", "error")[0]
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 8, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    lat = torch.zeros(1, 16, 8, 8)
    A.CALLS.clear()
    out = comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 0), 2, 1.0, "euler", "simple", cond, cond, lat,
                              disable_pbar=True, seed=0)
    assert torch.isfinite(out).all() and A.CALLS["sdpa_math"] >= 4 and set(A.CALLS) == {"sdpa_math"}


def test_auto_probes_and_records_its_choice_on_the_cpu(pack, flux_model, monkeypatch):
    A = pack.attn
    monkeypatch.setattr(A, "PROBE_CACHE", {})
    model = pack.toggle.FlashAttnToggle().apply(flux_model, "auto", "error")[0]
    A.CALLS.clear()
    flux_forward(model)
    (key, (choice, timings)), = A.PROBE_CACHE.items()
    assert key[0] == "cpu" and key[2] == 128 and set(timings) == {"sdpa", "sdpa_flash"}   # Flux heads: 128
    assert choice == min(timings, key=timings.get) and A.CALLS == {choice: 2}


def test_unavailable_backends_give_the_fix_and_leave_the_model_alone(pack, flux_model, comfy, caplog):
    node = pack.toggle.FlashAttnToggle()
    loaded_before = list(comfy.model_management.loaded_models())
    with pytest.raises(ValueError, match="pip install sageattention"):
        node.apply(flux_model, "sage", "error")
    with pytest.raises(ValueError, match="SDPA cuDNN needs a CUDA GPU"):
        node.apply(flux_model, "sdpa_cudnn", "error")
    with caplog.at_level(logging.WARNING, logger="lowvram"):
        model = node.apply(flux_model, "flash_attn", "fallback")[0]
    assert "pip install flash-attn" in caplog.text
    assert model.model_options["transformer_options"]["optimized_attention_override"].backend == "sdpa"
    assert "optimized_attention_override" not in flux_model.model_options["transformer_options"]
    assert list(comfy.model_management.loaded_models()) == loaded_before


def fake_cuda_model(head_dim, dtype):
    cfg = {"hidden_size": head_dim * 4, "num_heads": 4}
    base = SimpleNamespace(model_config=SimpleNamespace(unet_config=cfg), manual_cast_dtype=None, get_dtype=lambda: dtype)
    return SimpleNamespace(load_device=torch.device("cuda"), model=base, clone=lambda: pytest.fail("cloned a refused model"))


def test_head_size_and_dtype_the_backend_cannot_take_are_named(pack):
    patch = pack.attn_comfy.patch_model
    with pytest.raises(ValueError, match="head sizes up to 256; this model's heads are 512"):
        patch(fake_cuda_model(512, torch.bfloat16), "sdpa_flash", "error")
    with pytest.raises(ValueError, match="fp16/bf16 only; this model computes attention in torch.float32"):
        patch(fake_cuda_model(128, torch.float32), "sdpa_cudnn", "error")


def test_a_comfyui_without_the_override_is_refused(pack, monkeypatch, flux_model):
    import comfy.ldm.modules.attention as attention
    monkeypatch.delattr(attention, "wrap_attn")
    with pytest.raises(RuntimeError, match="no per-model attention override"):
        pack.toggle.FlashAttnToggle().apply(flux_model, "sdpa", "error")


# ---- the nodes in a real server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, synthetic_dir, tiny_model):
    for name in ("flux-ae", "flux-dev"):
        tiny_model(name)
    base = tmp_path_factory.mktemp("comfy-lazy-vae")
    (base / "input").mkdir(parents=True, exist_ok=True)
    lat = torch.randn((2, 16, 8, 12), generator=torch.Generator().manual_seed(5))
    marker = torch.tensor([])       # LoadLatent: without this key it rescales by 1/0.18215
    save_file({"latent_tensor": lat, "latent_format_version_0": marker}, str(base / "input" / "rand16.latent"))
    save_file({"latent_tensor": torch.zeros(0, 16, 8, 8), "latent_format_version_0": marker},
              str(base / "input" / "empty16.latent"))
    with ComfyServer(ServerConfig(base_dir=base, models_dirs=(synthetic_dir,))) as srv:
        yield srv


def node(cls, **inputs):
    return {"class_type": cls, "inputs": inputs}


def test_schemas_are_as_issued(server):
    info = server.object_info()
    lazy, toggle = info["LazyVAEDecode"], info["FlashAttnToggle"]
    assert lazy["input_order"]["required"] == ["samples", "vae", "tiling", "tile_size", "overlap", "offload_after_decode"]
    assert toggle["input_order"]["required"] == ["model", "backend", "on_unavailable"]
    assert (lazy["category"], toggle["category"]) == ("lowvram/latent", "lowvram/patches")
    assert (lazy["display_name"], toggle["display_name"]) == ("Lazy VAE Decode (LowVRAM)", "Flash Attention Toggle (LowVRAM)")
    assert lazy["input"]["required"]["tiling"][0] == ["auto", "never", "always"]
    assert toggle["input"]["required"]["backend"][0][0] == "auto"
    for spec in (lazy, toggle):
        assert spec["description"] and spec["output_tooltips"]
        assert all(v[1].get("tooltip") for v in spec["input"]["required"].values())


def test_bad_graphs_fail_clearly_and_the_server_keeps_running(server):
    vae = node("VAELoader", vae_name="ae.safetensors")
    decode = {"tiling": "auto", "tile_size": 0, "overlap": 64, "offload_after_decode": True}
    cases = [
        ({"1": vae, "2": node("EmptyLatentImage", width=64, height=64, batch_size=1),
          "3": node("LazyVAEDecode", samples=["2", 0], vae=["1", 0], **decode)}, "4 channels but this VAE takes 16"),
        ({"1": vae, "2": node("LoadLatent", latent="empty16.latent"),
          "3": node("LazyVAEDecode", samples=["2", 0], vae=["1", 0], **decode)}, "batch is empty"),
    ]
    for graph, message in cases:
        graph["9"] = node("SaveImage", images=["3", 0], filename_prefix="bad")
        with pytest.raises(ServerError, match=message):
            server.wait(server.queue(graph), timeout_s=300)
    graph = {"1": node("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default"),
             "2": node("FlashAttnToggle", model=["1", 0], backend="sage", on_unavailable="error"),
             "3": node("ModelSave", model=["2", 0], filename_prefix="diffusion_models/never_written")}
    with pytest.raises(ServerError, match="pip install sageattention"):
        server.wait(server.queue(graph), timeout_s=300)
    assert "LazyVAEDecode" in server.object_info()          # still answering


def test_never_auto_always_in_one_graph(server):
    graph = {"1": node("VAELoader", vae_name="ae.safetensors"), "2": node("LoadLatent", latent="rand16.latent")}
    for i, (tiling, tile) in enumerate([("never", 0), ("auto", 0), ("always", 64)]):
        graph[f"{10 + i}"] = node("LazyVAEDecode", samples=["2", 0], vae=["1", 0], tiling=tiling, tile_size=tile,
                                  overlap=16, offload_after_decode=True)
        graph[f"{20 + i}"] = node("SaveImage", images=[f"{10 + i}", 0], filename_prefix=f"lazy_{tiling}")
    entry = server.wait(server.queue(graph), timeout_s=600)
    images = {}
    for i, tiling in enumerate(["never", "auto", "always"]):
        files = entry["outputs"][f"{20 + i}"]["images"]
        assert len(files) == 2                                 # batch of 2
        images[tiling] = np.stack([np.asarray(Image.open(server.base_dir / "output" / f["subfolder"] / f["filename"]),
                                              dtype=np.float32) / 255 for f in files])
    assert images["never"].shape == (2, 64, 96, 3)
    assert np.array_equal(images["never"], images["auto"])     # small image, plenty of RAM: auto = untiled
    diff = np.abs(images["always"] - images["never"])          # 64-px tiles (the smallest) on random weights
    assert 0 < diff.mean() < 0.1


# ---- the GPU bench, smoke mode --------------------------------------------------------------------------------
def test_bench_smoke(tmp_path, comfy, synthetic_dir):
    proc = subprocess.run([sys.executable, "-m", "bench.vae_attention", "--out", str(tmp_path), "--smoke",
                           "--backends", "auto,sdpa_math,sage", "--models-dir", str(synthetic_dir)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("vae_attention_*.json")
    res = json.loads(result.read_text())
    assert res["smoke"] and res["environment"]["comfyui_version"] and res["environment"]["torch"]
    vae = [r for r in res["rows"] if r["part"] == "vae"]
    assert [r["method"] for r in vae] == ["comfy_vaedecode", "lazy_auto", "lazy_auto_uncapped", "lazy_never"]
    assert all(r["time_s"] > 0 and "error" not in r for r in vae) and vae[1]["plan"].startswith("whole")
    assert vae[1]["diff_vs_comfy_untiled_max"] == 0.0 and vae[1]["vae_loaded_after"] is False
    att = {(r["model"], r["backend"]): r for r in res["rows"] if r["part"] == "attention"}
    assert set(att) == {(m, b) for m in ("flux", "sdxl") for b in ("auto", "sdpa_math", "sage")}
    for m in ("flux", "sdxl"):
        assert att[(m, "sdpa_math")]["s_per_it"] > 0 and att[(m, "sdpa_math")]["served_by"].keys() == {"sdpa_math"}
        assert "pip install sageattention" in att[(m, "sage")]["error"]
        probe = att[(m, "auto")]["auto_probe"]
        assert len(probe) == 1 and next(iter(probe.values()))["choice"] in att[(m, "auto")]["served_by"]
        assert res["summary"][f"attention_{m}"]["auto_choice"] is not None
    assert "| method" in proc.stdout and "results:" in proc.stdout
