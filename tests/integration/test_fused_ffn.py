"""nodes.comfy_fused_ffn on ComfyUI 0.3.75 (CPU, the tiny synthetic NewBie DiT through Float8DiTLoader's load):
every SwiGLU feed-forward gets an object patch, ComfyUI applies and removes it with the model, the fused path
gives the module path's bits, and a layer ComfyUI casts per call (a LoRA weight function) keeps the module path.

The CPU stands in for an fp8 GPU here: the capability check says yes and torch._scaled_mm is a strict
stand-in that computes in float64 (harness.strict_scaled_mm); the real GEMM is compared on the GPU by
tests/unit/test_quant_swiglu.py."""
from __future__ import annotations

import importlib

import pytest
import torch

from harness.strict_scaled_mm import StrictScaledMM

pytestmark = pytest.mark.comfy
FFN_PATCH = ".feed_forward.forward"


@pytest.fixture(scope="module")
def loaded_once(comfy, tiny_model):
    from harness.pack_import import import_pack

    import_pack()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "_scaled_mm", StrictScaledMM())
        mp.setattr(importlib.import_module("lowvram_kit.quant.matmul"), "fp8_matmul_supported", lambda d: True)
        fp8 = importlib.import_module("lowvram_kit.nodes.comfy_fp8_loading")
        quant = importlib.import_module("lowvram_kit.quant")
        model, report = fp8.load_fp8_model(str(tiny_model("newbie")), fp8.Fp8LoadConfig(quant.QuantConfig()))
        assert report.compute == "fp8"
        yield model, importlib.import_module("lowvram_kit.nodes.comfy_fused_ffn")


@pytest.fixture
def loaded(loaded_once):
    yield loaded_once
    loaded_once[0].unpatch_model()


def ffn_modules(model) -> list[str]:
    return [name for name, m in model.model.diffusion_model.named_modules() if type(m).__name__ == "FeedForward"]


def patched(module, fused) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is fused.fused_swiglu_forward and forward.__self__ is module


def test_every_feed_forward_is_patched_in_and_out_with_the_model(loaded):
    model, fused = loaded
    names = ffn_modules(model)
    assert len(names) == 5   # tiny NewBie: 1 layer, 2 noise refiners, 2 context refiners
    assert sorted(k for k in model.object_patches if k.endswith(FFN_PATCH)) == \
        sorted(f"diffusion_model.{n}.forward" for n in names)
    dm = model.model.diffusion_model
    model.patch_model()
    assert all(patched(dm.get_submodule(n), fused) for n in names)
    model.unpatch_model()
    assert not any(patched(dm.get_submodule(n), fused) for n in names)


def module_input(seed=5) -> torch.Tensor:
    # [2 images, 7 tokens, 2304] in bf16, what the FeedForward gets on a GPU that computes in bf16
    return (torch.randn(2, 7, 2304, generator=torch.Generator().manual_seed(seed)) * 2).to(torch.bfloat16)


def test_the_fused_path_gives_the_module_paths_bits(loaded):
    model, fused = loaded
    model.patch_model()
    x = module_input()
    for name in ("context_refiner.0.feed_forward", "layers.0.feed_forward"):   # (each takes seconds here)
        m = model.model.diffusion_model.get_submodule(name)
        want = type(m).forward(m, x)              # ComfyUI's FeedForward.forward: our fp8 layers one by one
        before = dict(fused.CALLS)
        got = m(x)
        assert (fused.CALLS["fused"] - before["fused"], fused.CALLS["module"] - before["module"]) == (1, 0)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), name


def test_a_layer_with_a_weight_function_keeps_comfyuis_path(loaded):
    model, fused = loaded
    model.patch_model()
    m = model.model.diffusion_model.get_submodule(ffn_modules(model)[0])
    x = module_input()
    fused_out = m(x)
    m.w3.weight_function = [lambda w: w]   # what ComfyUI's lowvram LoRA patching attaches
    try:
        before = dict(fused.CALLS)
        got = m(x)
    finally:
        m.w3.weight_function = []
    assert (fused.CALLS["fused"] - before["fused"], fused.CALLS["module"] - before["module"]) == (0, 1)
    # ComfyUI's cast path for that layer, with an identity weight function: the same values
    assert torch.equal(got, fused_out)


def test_an_input_that_is_not_bf16_keeps_the_module_path(loaded):
    # On the CPU ComfyUI computes this bf16 model in fp32 (manual cast); fp16 is a GPU without bf16.
    model, fused = loaded
    model.patch_model()
    m = model.model.diffusion_model.get_submodule("context_refiner.0.feed_forward")
    for dtype in (torch.float32, torch.float16):
        x = module_input().to(dtype)
        before = dict(fused.CALLS)
        got = m(x)
        assert (fused.CALLS["fused"] - before["fused"], fused.CALLS["module"] - before["module"]) == (0, 1)
        assert torch.equal(got, type(m).forward(m, x)), dtype


def test_the_ab_switch_leaves_the_model_unpatched(loaded, monkeypatch):
    model, fused = loaded
    monkeypatch.setenv(fused.DISABLE_ENV, "0")
    clone = model.clone()
    clone.object_patches = {}
    assert fused.add_fused_ffn_patches(clone) == 0 and clone.object_patches == {}
    monkeypatch.delenv(fused.DISABLE_ENV)
    assert fused.add_fused_ffn_patches(clone) == 5


def test_a_model_loaded_with_fast_accumulation_fuses_with_it(loaded, monkeypatch):
    model, fused = loaded
    model.patch_model()
    m = model.model.diffusion_model.get_submodule("context_refiner.0.feed_forward")
    monkeypatch.setattr(type(m.w1), "fp8_fast_accum", True)   # the ops class every fp8 layer of the model shares
    calls = torch._scaled_mm.calls                            # the strict stand-in of loaded_once
    start = len(calls)
    m(module_input())
    assert [c["fast_accum"] for c in calls[start:]] == [True] * 3


def test_one_compiled_graph_serves_every_patched_feed_forward(loaded):
    """CompileModelBlocks compiles a block class's forward once for all blocks. The patched forward must not
    make torch.compile specialize on each module (a guard per patch object recompiled once per block, 40 on
    NewBie, past dynamo's recompile limit, and the blocks then ran eager with the guards' cost on top)."""
    import torch._dynamo

    model, fused = loaded
    model.patch_model()
    assert all(patched(model.model.diffusion_model.get_submodule(n), fused) for n in ffn_modules(model))
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    run = torch.compile(lambda m, x: m(x), backend=counting_backend)
    x = module_input().float()   # float32: the module path (no fp8 GEMM stand-in inside the graph)
    dm = model.model.diffusion_model
    with torch.no_grad():
        for name in ("context_refiner.0.feed_forward", "context_refiner.1.feed_forward",
                     "noise_refiner.0.feed_forward", "layers.0.feed_forward"):
            m = dm.get_submodule(name)
            assert run(m, x).shape == x.shape, name
    torch._dynamo.reset()
    assert len(graphs) == 1, f"{len(graphs)} graphs for 4 feed-forwards of one class and shape"
