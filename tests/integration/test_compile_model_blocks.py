"""CompileModelBlocks (in-process, CPU): every block of a tiny Flux compiled through ComfyUI's own compile
wrapper, the output bit-identical to the eager model, and the refusals of the ChunkedOffloadUNet pairing.

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
        node=importlib.import_module("lowvram_kit.nodes.compile_model_blocks"))


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


def test_streaming_and_compiling_refuse_each_other(pack, flux):
    settings = pack.streaming.StreamingSettings(1 << 30, 0, 0, False)
    streamed, _session = pack.streaming.stream_blocks(flux, settings)
    with pytest.raises(pack.compile.CompileConflict, match="ChunkedOffloadUNet.*Use one of the two"):
        pack.compile.compile_blocks(streamed, backend="aot_eager")
    compiled = pack.compile.compile_blocks(flux, backend="aot_eager")
    with pytest.raises(ValueError, match="compiled blocks would bypass the hooks"):
        pack.streaming.stream_blocks(compiled, settings)


def test_an_unknown_mode_is_refused_and_the_cpu_node_passes_through(pack, flux):
    with pytest.raises(ValueError, match="choose one of: default, max-autotune-no-cudagraphs"):
        pack.compile.compile_blocks(flux, mode="fast")
    (out,) = pack.node.CompileModelBlocks().patch(flux, "default")   # CI has no GPU
    assert out is flux
