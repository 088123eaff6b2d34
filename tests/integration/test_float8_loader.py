"""Float8DiTLoader inside ComfyUI (in-process, CPU): fidelity against ComfyUI's own fp8 options, LoRA on
top, the saved copy, and bad files. The GPU speed criteria live in bench/."""
import importlib
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytestmark = pytest.mark.comfy
STEPS = 3


@pytest.fixture(scope="module")
def pack(comfy):
    from harness.pack_import import import_pack

    import_pack()
    return importlib.import_module("lowvram_kit.nodes.comfy_fp8_loading")


@pytest.fixture(scope="module")
def flux_path(tiny_model):
    return str(tiny_model("flux-dev"))


def denoise(model, seed=0, steps=STEPS):
    """A few Euler steps of the flow ODE on a fixed 1x16x16x16 latent with fixed conditioning."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])  # applies LoRA patches, as sampling does
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 16, 16, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g)
    y = torch.randn(1, 768, generator=g)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
            v = model.model.apply_model(x, s0.reshape(1), c_crossattn=ctx, y=y, guidance=torch.tensor([3.5])).float()
            x = x + (s1 - s0) * v
    return x


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def load(pack, path, **kw):
    from lowvram_kit.quant import QuantConfig

    hp = kw.pop("high_precision_layers", "auto")
    return pack.load_fp8_model(path, pack.Fp8LoadConfig(QuantConfig(**kw), hp))


@pytest.fixture(scope="module")
def reference(comfy, flux_path):
    model = comfy.sd.load_diffusion_model(flux_path, model_options={"dtype": torch.bfloat16})
    return model, denoise(model)


def test_per_channel_fp8_is_closer_to_bf16_than_comfyui_fp8_options(comfy, pack, flux_path, reference):
    _, ref = reference
    ours, report = load(pack, flux_path)
    assert report.family == "flux" and report.quantized_layers > 0 and report.compute == "dequant"
    err_ours = rel_l2(denoise(ours), ref)
    # ComfyUI's plain fp8 storage (UNETLoader weight_dtype fp8_e4m3fn): a cast without scales.
    plain = comfy.sd.load_diffusion_model(flux_path, model_options={"dtype": torch.float8_e4m3fn})
    err_plain = rel_l2(denoise(plain), ref)
    # One scale per tensor, the granularity of ComfyUI's scaled-fp8 / --fast files.
    per_tensor, _ = load(pack, flux_path, granularity="per_tensor")
    err_tensor = rel_l2(denoise(per_tensor), ref)
    print(f"rel L2 after {STEPS} steps: per-channel {err_ours:.4f}, per-tensor {err_tensor:.4f}, plain {err_plain:.4f}")
    assert err_ours < err_tensor and err_ours < err_plain
    assert err_ours < 0.05


def test_layers_kept_in_high_precision_follow_the_family_table(pack, flux_path):
    model, _ = load(pack, flux_path)
    dm = model.model.diffusion_model
    assert dm.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert dm.double_blocks[0].img_attn.qkv.weight_scale.shape == (9216,)
    assert dm.img_in.weight.dtype == torch.bfloat16 and dm.final_layer.linear.weight.dtype == torch.bfloat16
    custom, _ = load(pack, flux_path, high_precision_layers=r"auto, double_blocks\.0\.img_attn\.qkv")
    assert custom.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16


def flux_lora(path, rank=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer, (out_f, in_f) in {"double_blocks.0.img_attn.qkv": (9216, 3072), "single_blocks.0.linear2": (3072, 15360)}.items():
        sd[f"diffusion_model.{layer}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) * 0.05).to(torch.bfloat16)
        sd[f"diffusion_model.{layer}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * 0.05).to(torch.bfloat16)
    save_file(sd, path)
    return path


def test_lora_on_fp8_matches_lora_on_bf16(comfy, pack, flux_path, reference, tmp_path):
    import comfy.utils

    lora = comfy.utils.load_torch_file(flux_lora(str(tmp_path / "lora.safetensors")))
    base_bf16, ref = reference
    ours, _ = load(pack, flux_path)
    out = denoise(ours)
    ref_lora = denoise(comfy.sd.load_lora_for_models(base_bf16, None, lora, 1.0, 0)[0])
    out_lora = denoise(comfy.sd.load_lora_for_models(ours, None, lora, 1.0, 0)[0])
    delta_ref, delta_ours = ref_lora - ref, out_lora - out
    assert delta_ref.norm() / ref.norm() > 0.05, "the LoRA should change the output"
    # The LoRA's effect on the fp8 model reproduces its effect on the bf16 model ...
    assert rel_l2(delta_ours, delta_ref) < 0.25
    # ... and fp8 + LoRA stays as close to bf16 + LoRA as fp8 alone is to bf16.
    assert rel_l2(out_lora, ref_lora) < 1.5 * rel_l2(out, ref) + 0.005


def test_saved_copy_reloads_identically(pack, flux_path, tmp_path):
    from lowvram_kit.quant import QuantConfig

    copy = str(tmp_path / "flux.lowvram.safetensors")
    first, report = pack.load_fp8_model(flux_path, pack.Fp8LoadConfig(QuantConfig(), save_copy_to=copy))
    assert report.saved_copy == copy
    again, report2 = pack.load_fp8_model(copy, pack.Fp8LoadConfig(QuantConfig()))
    assert report2.layout == "lowvram" and report2.quantized_layers == 0 and report2.fp8_source_layers > 0
    a = first.model.diffusion_model.single_blocks[0].linear1
    b = again.model.diffusion_model.single_blocks[0].linear1
    assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))
    assert torch.equal(a.weight_scale, b.weight_scale)


def test_a_current_saved_copy_is_loaded_instead_of_quantizing_again(pack, flux_path, tmp_path):
    """save_quantized_copy: the first load writes the copy, later ones load it while the source file and the
    settings that shaped it are unchanged; a changed source or setting makes a new copy."""
    import os
    import shutil

    from lowvram_kit.quant import QuantConfig

    src = tmp_path / "flux1-dev.safetensors"
    shutil.copyfile(flux_path, src)
    copy = str(tmp_path / "flux1-dev.lowvram-e4m3fn-per_channel.safetensors")
    cfg = pack.Fp8LoadConfig(QuantConfig(), save_copy_to=copy)
    first, made = pack.load_fp8_model(str(src), cfg)
    assert made.saved_copy == copy and made.reused_copy is None and made.quantized_layers > 0
    again, reused = pack.load_fp8_model(str(src), cfg)
    assert reused.reused_copy == copy and reused.saved_copy is None and reused.quantized_layers == 0
    assert "which is current" in reused.text()
    a = first.model.diffusion_model.double_blocks[0].img_mlp[0]
    b = again.model.diffusion_model.double_blocks[0].img_mlp[0]
    assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8)) and torch.equal(a.weight_scale,
                                                                                                 b.weight_scale)
    other = pack.Fp8LoadConfig(QuantConfig(), high_precision_layers="auto, img_mlp", save_copy_to=copy)
    assert pack.load_fp8_model(str(src), other)[1].reused_copy is None   # another setting: made anew
    assert pack.load_fp8_model(str(src), other)[1].reused_copy == copy
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))             # the source changed
    changed = pack.load_fp8_model(str(src), other)[1]
    assert changed.reused_copy is None and changed.saved_copy == copy


def test_loading_shows_progress_and_a_cancel_stops_it_leaving_no_file(pack, flux_path, tmp_path, monkeypatch):
    """The quantizing load moves ComfyUI's progress bar tensor by tensor, and the cancel button stops it
    between two tensors: ComfyUI's InterruptProcessingException, and no saved copy, not even a partial one."""
    import comfy.model_management as mm
    import comfy.utils

    from lowvram_kit.quant import QuantConfig

    updates = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: updates.append(
        (value, total)))
    pack.load_fp8_model(flux_path, pack.Fp8LoadConfig(QuantConfig()))
    total = updates[-1][1]
    assert updates[-1] == (total, total) and len(updates) == total > 10

    copy = tmp_path / "flux.lowvram.safetensors"
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            pack.load_fp8_model(flux_path, pack.Fp8LoadConfig(QuantConfig(), save_copy_to=str(copy)))
    finally:
        mm.interrupt_current_processing(False)
    assert list(tmp_path.iterdir()) == []


def test_a_text_encoder_file_is_refused_naming_what_was_looked_for(pack, tiny_model):
    with pytest.raises(ValueError, match="not a diffusion model .*double_blocks"):
        load(pack, str(tiny_model("clip-l")))


def test_truncated_file_is_refused(pack, flux_path, tmp_path):
    from lowvram_kit.quant import QuantFileError

    bad = tmp_path / "truncated.safetensors"
    with open(flux_path, "rb") as src:
        header_len = struct.unpack("<Q", src.read(8))[0]
        src.seek(0)
        bad.write_bytes(src.read(8 + header_len + 1000))
    with pytest.raises(QuantFileError, match="truncated"):
        load(pack, str(bad))


def test_nan_layer_is_named(pack, tmp_path):
    from lowvram_kit.quant import NonFiniteWeightError

    sd = {"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(128, dtype=torch.bfloat16),
          "double_blocks.0.img_attn.qkv.weight": torch.randn(64, 32).to(torch.bfloat16)}
    sd["double_blocks.0.img_attn.qkv.weight"][3, 5] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path))
    with pytest.raises(NonFiniteWeightError, match=r"double_blocks\.0\.img_attn\.qkv\.weight"):
        load(pack, str(path))


def test_quantizing_falls_back_to_the_cpu_when_the_gpu_is_out_of_memory(pack, monkeypatch, caplog):
    asked = []

    def read(device):
        asked.append(device.type)
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 300.00 MiB (simulated)")
        return "read on the cpu"

    monkeypatch.setattr(pack, "quantization_device", lambda: torch.device("cuda", 0))
    with caplog.at_level("WARNING", logger="lowvram"):
        assert pack.quantize_on_device(read) == "read on the cpu"
    assert asked == ["cuda", "cpu"]
    assert "quantizing on the CPU instead" in caplog.text


def test_a_resident_fp8_layer_skips_cast_bias_weight_and_gives_the_same_output(pack, monkeypatch):
    import comfy.ops

    from lowvram_kit.nodes.comfy_fp8_ops import make_fp8_ops
    from lowvram_kit.quant.scales import quantize_weight

    g = torch.Generator().manual_seed(3)
    q, scale = quantize_weight(torch.randn(48, 64, generator=g), "e4m3fn", "per_channel")
    layer = make_fp8_ops("dequant").Linear(64, 48, device="meta")
    layer.load_state_dict({"weight": q, "weight_scale": scale, "bias": torch.randn(48, generator=g)}, assign=True)
    calls = []
    real = comfy.ops.cast_bias_weight
    monkeypatch.setattr(comfy.ops, "cast_bias_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    direct = layer(x)
    assert calls == [], "a weight on the input's device needs no cast"
    assert torch.equal(direct, layer.forward_comfy_cast_weights(x))
    calls.clear()
    layer.weight_function.append(lambda w: w)   # a lowvram LoRA patch: the weight must go through ComfyUI's cast
    assert torch.equal(layer(x), direct) and calls == [1]


def test_cast_free_operations_where_comfyui_would_pick_them_give_the_same_output(pack, flux_path, monkeypatch):
    import comfy.model_management

    def casting(model):
        """comfy_cast_weights of every high-precision layer that has the flag (norms, kept Linears)."""
        return {m.comfy_cast_weights for m in model.model.diffusion_model.modules()
                if hasattr(m, "comfy_cast_weights") and getattr(m, "weight_scale", None) is None}

    # On a GPU with bf16, ComfyUI computes a bf16 model in bf16 and picks operations that cast nothing.
    monkeypatch.setattr(comfy.model_management, "unet_manual_cast", lambda *a, **k: None)
    free, _ = load(pack, flux_path)
    real = pack.make_fp8_ops
    monkeypatch.setattr(pack, "make_fp8_ops", lambda *a, **k: real(*a, **{**k, "cast_weights": True}))
    cast, _ = load(pack, flux_path)
    assert casting(free) == {False} and casting(cast) == {True}
    assert torch.equal(denoise(free), denoise(cast))


def test_the_node_reads_the_file_in_a_worker_thread_and_builds_the_model_on_the_prompts(pack, flux_path,
                                                                                        monkeypatch):
    """Float8DiTLoader.load is async: ComfyUI starts it first and runs the other nodes (the text encoder) while
    it awaits the file's quantization in a worker thread; ComfyUI's model is built on the prompt's thread."""
    import asyncio
    import inspect
    import threading

    node_module = importlib.import_module("lowvram_kit.nodes.float8_dit_loader")
    assert inspect.iscoroutinefunction(node_module.Float8DiTLoader.load)
    threads = {}

    def traced(name, fn):
        def run(*args):
            threads[name] = threading.current_thread()
            return fn(*args)
        return run

    monkeypatch.setattr(node_module, "resolve_path", lambda name: flux_path)
    monkeypatch.setattr(node_module, "read_fp8_file", traced("read", pack.read_fp8_file))
    monkeypatch.setattr(node_module, "build_fp8_model", traced("build", pack.build_fp8_model))
    (model,) = asyncio.run(node_module.Float8DiTLoader().load("flux1-dev.safetensors", "e4m3fn", "per_channel",
                                                              "auto", "auto", False))
    assert threads["read"] is not threading.current_thread() and threads["build"] is threading.current_thread()
    expected, _ = load(pack, flux_path)
    a, b = model.model.diffusion_model.single_blocks[0].linear1, expected.model.diffusion_model.single_blocks[0].linear1
    assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))


def test_quantizing_on_the_gpu_reserves_its_peak_from_our_streaming_budgets(pack, flux_path, monkeypatch):
    """While the loader quantizes on CUDA beside the text encoder, the encoder's streaming plan (and the
    diffusion model's) must not count the quantizer's memory as free."""
    import comfy.model_management as mm

    from lowvram_kit.nodes import _device_reservations as reservations
    from lowvram_kit.nodes.comfy_block_streaming import BlockStreamingSession
    from lowvram_kit.quant import QuantConfig

    gpu = torch.device("cuda", 0)
    seen = []
    monkeypatch.setattr(mm, "get_free_memory", lambda device=None, torch_free_too=False: 8 * 2**30)
    monkeypatch.setattr(pack, "quantization_device", lambda: gpu)
    monkeypatch.setattr(pack, "quantize_file", lambda *a, **kw: seen.append(
        (reservations.reserved_bytes(gpu), BlockStreamingSession.free_bytes(gpu))) or "read")
    assert pack._quantize_file(flux_path, QuantConfig(), None, "") == "read"
    peak = pack.quantizer_peak_bytes(flux_path, "")
    with safe_open(flux_path, "pt") as f:
        largest = max(f.get_tensor(k).nbytes for k in f.keys() if len(f.get_slice(k).get_shape()) == 2)
    assert peak >= 3 * largest and seen == [(peak, 8 * 2**30 - peak)]
    assert reservations.reserved_bytes(gpu) == 0 and BlockStreamingSession.free_bytes(gpu) == 8 * 2**30


def test_the_fast_accumulation_choice_reaches_the_models_layers(pack, flux_path, monkeypatch):
    import asyncio

    node_module = importlib.import_module("lowvram_kit.nodes.float8_dit_loader")
    seen = []
    monkeypatch.setattr(node_module, "resolve_path", lambda name: flux_path)
    monkeypatch.setattr(node_module, "read_fp8_file", lambda path, cfg: seen.append(cfg) or pack.read_fp8_file(path, cfg))
    loader = node_module.Float8DiTLoader()
    (model,) = asyncio.run(loader.load("flux1-dev.safetensors", "e4m3fn", "per_channel", "auto_fast_accum", "auto", False))
    (plain,) = asyncio.run(loader.load("flux1-dev.safetensors", "e4m3fn", "per_channel", "auto", "auto", False))
    assert [(c.fast_accum, c.quant.compute) for c in seen] == [(True, "auto"), (False, "auto")]
    assert type(model.model.diffusion_model.single_blocks[0].linear1).fp8_fast_accum is True
    assert type(plain.model.diffusion_model.single_blocks[0].linear1).fp8_fast_accum is False
    assert "auto_fast_accum" in node_module.Float8DiTLoader.INPUT_TYPES()["required"]["compute"][0]
