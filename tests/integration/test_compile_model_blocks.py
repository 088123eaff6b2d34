"""CompileModelBlocks (in-process, CPU): every block of a tiny Flux compiled through ComfyUI's own compile
wrapper, the output bit-identical to the eager model, and how it pairs with ChunkedOffloadUNet (the bit-exact
streaming of compiled blocks is in test_block_streaming.py).

torch.compile runs with backend "aot_eager" here (dynamo and AOTAutograd, no code generation): what these
tests check is that the compiled modules are the ones ComfyUI runs for each block, that nothing outside the
blocks is compiled, and that the output does not change. Inductor's kernels are measured on the GPU
(bench.compile_fidelity: a compiled block is bit-identical to eager there too).
"""
import importlib
import types

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def pack(comfy):
    from harness.pack_import import import_pack

    import_pack()
    return types.SimpleNamespace(
        compile=importlib.import_module("lowvram_kit.nodes.comfy_block_compile"),
        streaming=importlib.import_module("lowvram_kit.nodes.comfy_block_streaming"),
        node=importlib.import_module("lowvram_kit.nodes.compile_model_blocks"),
        forwards=importlib.import_module("lowvram_kit.nodes._compiled_forwards"))


@pytest.fixture(scope="module")
def flux(tiny_flux_patcher):
    """ComfyUI's Flux class at hidden size 32 (fp32): 1 double + 2 single blocks, built in-process."""
    return tiny_flux_patcher(depth_single_blocks=2)


def run(model):
    import comfy.sample

    g = torch.Generator().manual_seed(0)
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=g)
    cond = [[torch.randn(1, 8, 64, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    with torch.no_grad():
        return comfy.sample.sample(model, noise, 2, 1.0, "euler", "simple", cond, cond, latent, seed=0,
                                   disable_pbar=True)


def test_every_block_is_compiled_and_the_output_is_unchanged(pack, flux, comfy_cleanup):
    ref = run(flux)
    torch._dynamo.reset()
    compiled = pack.compile.compile_blocks(flux, backend="aot_eager")
    keys = pack.compile.block_keys(compiled)
    assert keys == ["diffusion_model.double_blocks.0", "diffusion_model.single_blocks.0",
                    "diffusion_model.single_blocks.1"]
    dm = compiled.model.diffusion_model
    seen = []

    def spy(executor, *args, **kwargs):   # runs inside ComfyUI's compile wrapper: the blocks are swapped in
        seen.append([type(b).__name__ for b in (*dm.double_blocks, *dm.single_blocks)])
        return executor(*args, **kwargs)

    from comfy.patcher_extension import WrappersMP
    compiled.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_spy", spy)
    out = run(compiled)
    torch._dynamo.reset()
    assert seen and all(names == ["OptimizedModule"] * 3 for names in seen)
    assert type(dm).__name__ == "Flux" and type(dm.final_layer).__name__ != "OptimizedModule"
    assert not any(type(b).__name__ == "OptimizedModule" for b in dm.single_blocks)   # restored after the call
    assert torch.equal(out, ref)
    assert not flux.get_wrappers(WrappersMP.APPLY_MODEL, pack.compile.COMPILE_KEY)   # the input is untouched


def test_a_whole_model_compile_is_refused_by_streaming_and_block_compiles_compose(pack, flux):
    from comfy.patcher_extension import WrappersMP
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    settings = pack.streaming.StreamingSettings(1 << 30, 0, 0, False)
    whole = flux.clone()
    set_torch_compile_wrapper(model=whole, backend="aot_eager")   # what ComfyUI's TorchCompileModel does
    with pytest.raises(ValueError, match="compiled as a whole.*Use CompileModelBlocks instead"):
        pack.streaming.stream_blocks(whole, settings)
    # CompileModelBlocks after streaming: only the request is attached, no module-swapping wrapper
    streamed, session = pack.streaming.stream_blocks(flux, settings)
    compiled = pack.compile.compile_blocks(streamed, backend="aot_eager")
    assert compiled.attachments[pack.forwards.COMPILE_ATTACHMENT].backend == "aot_eager"
    assert not compiled.get_wrappers(WrappersMP.APPLY_MODEL, pack.compile.COMPILE_KEY)
    assert session.compile_request(compiled) is not None and session.compile_request(streamed) is None
    # ... and before it: streaming takes ComfyUI's wrapper off its clone, keeping the request
    first = pack.compile.compile_blocks(flux, backend="aot_eager")
    assert first.get_wrappers(WrappersMP.APPLY_MODEL, pack.compile.COMPILE_KEY)
    then, _ = pack.streaming.stream_blocks(first, settings)
    assert not then.get_wrappers(WrappersMP.APPLY_MODEL, pack.compile.COMPILE_KEY)
    assert then.attachments[pack.forwards.COMPILE_ATTACHMENT] == first.attachments[pack.forwards.COMPILE_ATTACHMENT]


def test_an_unknown_mode_is_refused_and_the_cpu_node_passes_through(pack, flux):
    with pytest.raises(ValueError, match="choose one of: default, max-autotune-no-cudagraphs"):
        pack.compile.compile_blocks(flux, mode="fast")
    (out,) = pack.node.CompileModelBlocks().patch(flux, "default")   # CI has no GPU
    assert out is flux
