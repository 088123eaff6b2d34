"""ChunkedOffloadUNet's adapter inside ComfyUI (in-process, CPU): streaming through ComfyUI's real sampler
gives bit-identical latents, with and without LoRA, on fp8 and bf16 weights, and releases everything.

On the CPU the "device" is the host: resident groups stay put and streamed groups are copied host to host,
which exercises the whole mechanism (object patches, hidden block lists, hooks, LoRA weight functions,
accounting, detach) except the CUDA streams, which the GPU benchmark checks.
"""
import importlib

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.comfy
MiB = 1 << 20


@pytest.fixture(scope="module")
def adapters(comfy):
    from harness.pack_import import import_pack

    import_pack()
    return (importlib.import_module("lowvram_kit.nodes.comfy_block_streaming"),
            importlib.import_module("lowvram_kit.nodes.comfy_fp8_loading"))


def sample(comfy, model, seed=0, steps=2):
    import comfy.sample

    g = torch.Generator().manual_seed(seed)
    latent = torch.zeros(1, 16, 16, 16)
    noise = torch.randn(latent.shape, generator=g)
    cond = [[torch.randn(1, 8, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    with torch.no_grad():
        return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, seed=seed)


def block_bytes(model):
    dm = model.model.diffusion_model
    return sum(p.numel() * p.element_size() for blk in list(dm.double_blocks) + list(dm.single_blocks)
               for p in blk.parameters())


def streamed(adapters, model, budget_bytes, **kw):
    streaming, _ = adapters
    settings = streaming.StreamingSettings(budget_bytes, kw.get("chunk_size", 0), kw.get("prefetch", 0), False)
    return streaming.stream_blocks(model, settings)


@pytest.fixture(scope="module")
def flux6_path(tmp_path_factory):
    from harness.synthetic.flux import FluxConfig, flux_specs
    from harness.synthetic.writer import write_specs

    path = tmp_path_factory.mktemp("flux6") / "flux-1d5s.safetensors"
    write_specs(path, flux_specs(FluxConfig(depth=1, depth_single=5), torch.bfloat16), {"format": "pt"}, seed=5)
    return path


@pytest.fixture(scope="module")
def flux_fp8(adapters, flux6_path):
    """Flux-dev with 1 double + 5 single blocks (the tiny model's 2 blocks leave nothing worth streaming:
    two transfer slots of the largest block already hold both), quantized by Float8DiTLoader's route."""
    from lowvram_kit.quant import QuantConfig

    _, loading = adapters
    model, _ = loading.load_fp8_model(str(flux6_path), loading.Fp8LoadConfig(QuantConfig()))
    return model


def partial_budget(model) -> int:
    """Activations (~120 MiB at this size) + the streamer's 256 MiB margin + 60% of the block bytes."""
    return 376 * MiB + int(0.6 * block_bytes(model))


def test_streaming_is_bit_identical_and_releases_everything(comfy, adapters, flux_fp8, comfy_cleanup):
    ref = sample(comfy, flux_fp8)
    comfy.model_management.unload_all_models()
    clone, session = streamed(adapters, flux_fp8, partial_budget(flux_fp8))
    out = sample(comfy, clone)
    assert session.streamer is not None and session.streamer.plan.streamed_groups, session.plan_text
    assert session.streamer.copies > 0
    assert torch.equal(out, ref)
    # ComfyUI never saw the block weights: it loaded only the rest, plus what the streamer reported.
    comfy.model_management.unload_all_models()
    assert session.streamer is None  # ON_DETACH released slots, pinned buffers and hooks
    streaming, _ = adapters
    assert session.blocks[0] in streaming.PARKED_HOSTS   # the packed host buffers wait, unpinned
    # Loaded again: the streamed groups stream from those buffers, nothing is packed a second time.
    assert torch.equal(sample(comfy, clone), ref)
    assert session.streamer.adopted_groups == len(session.streamer.plan.streamed_groups) > 0
    assert session.blocks[0] not in streaming.PARKED_HOSTS
    comfy.model_management.unload_all_models()
    # The original model is untouched and still gives the reference.
    assert torch.equal(sample(comfy, flux_fp8), ref)


def flux_lora(comfy, tmp_path):
    """A rank-4 LoRA on the double block's MLP and every single block's linear1, so that both blocks the
    plan keeps on the device and blocks it streams carry a patch."""
    import comfy.utils

    g = torch.Generator().manual_seed(3)
    layers = {"double_blocks.0.img_mlp.0": (12288, 3072)}
    layers.update({f"single_blocks.{i}.linear1": (21504, 3072) for i in range(5)})
    lora = {}
    for layer, (o, i) in layers.items():
        lora[f"diffusion_model.{layer}.lora_down.weight"] = (torch.randn(4, i, generator=g) * 0.05).to(torch.bfloat16)
        lora[f"diffusion_model.{layer}.lora_up.weight"] = (torch.randn(o, 4, generator=g) * 0.05).to(torch.bfloat16)
    save_file(lora, str(tmp_path / "l.safetensors"))
    return comfy.utils.load_torch_file(str(tmp_path / "l.safetensors"))


@pytest.mark.parametrize("weights", ["fp8", "bf16"])
def test_streaming_with_lora_is_bit_identical_to_lora_without_streaming(comfy, adapters, flux_fp8, flux6_path, weights,
                                                                       tmp_path, comfy_cleanup):
    """ComfyUI merges a LoRA into a fully loaded model in fp32 and rounds once; streaming computes the same
    values: merged into the device copy of resident blocks at attach, per call for streamed ones."""
    import comfy.sd

    model = flux_fp8 if weights == "fp8" else comfy.sd.load_diffusion_model(str(flux6_path))
    lora = flux_lora(comfy, tmp_path)
    base = sample(comfy, model)
    ref = sample(comfy, comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0])
    assert not torch.equal(ref, base)
    comfy.model_management.unload_all_models()
    # LoRA applied after the streaming node (the usual graph order: loader -> stream -> LoRA)
    clone, session = streamed(adapters, model, partial_budget(model))
    lora_clone = comfy.sd.load_lora_for_models(clone, None, lora, 1.0, 0)[0]  # held: its GC would unload it
    out = sample(comfy, lora_clone)
    streamer = session.streamer
    assert streamer is not None and streamer.plan.streamed_groups and streamer.plan.resident_blocks, session.plan_text
    per_call = {i: any(m.weight_function for m in b.modules() if hasattr(m, "weight_function"))
                for i, b in enumerate(session.blocks)}
    assert all(per_call[i] != streamer.is_resident(i) for i in per_call), (per_call, session.plan_text)
    assert torch.equal(out, ref)
    comfy.model_management.unload_all_models()
    # The host weights never took the LoRA: the model without it still gives the base result.
    assert torch.equal(sample(comfy, model), base)


@pytest.mark.parametrize("order", ["compile_then_stream", "stream_then_compile"])
def test_compiled_blocks_stream_bit_identically(comfy, adapters, flux_fp8, order, comfy_cleanup):
    """CompileModelBlocks with ChunkedOffloadUNet, in either order: the streamer compiles each block's forward
    (backend aot_eager here: dynamo and AOTAutograd, no code generation) with its hooks outside the graphs.
    The output equals the compiled model without streaming, bit for bit; the forwards are removed on unload."""
    blocks_compile = importlib.import_module("lowvram_kit.nodes.comfy_block_compile")
    forwards = importlib.import_module("lowvram_kit.nodes._compiled_forwards")
    torch._dynamo.reset()
    ref = sample(comfy, blocks_compile.compile_blocks(flux_fp8, backend="aot_eager"))
    comfy.model_management.unload_all_models()
    if order == "compile_then_stream":
        model, session = streamed(adapters, blocks_compile.compile_blocks(flux_fp8, backend="aot_eager"),
                                  partial_budget(flux_fp8))
    else:
        clone, session = streamed(adapters, flux_fp8, partial_budget(flux_fp8))
        model = blocks_compile.compile_blocks(clone, backend="aot_eager")
    seen = []
    from comfy.patcher_extension import WrappersMP

    def spy(executor, *args, **kwargs):   # inside the streaming wrapper's call: attached, forwards installed
        seen.append([forwards.installed(b) for b in session.blocks])
        return executor(*args, **kwargs)
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_spy", spy)
    out = sample(comfy, model)
    assert session.streamer is not None and session.streamer.plan.streamed_groups, session.plan_text
    assert seen and all(all(flags) for flags in seen)
    assert torch.equal(out, ref)
    comfy.model_management.unload_all_models()
    assert session.streamer is None and not any(forwards.installed(b) for b in session.blocks)
    torch._dynamo.reset()


def test_compile_model_blocks_on_a_model_whose_streamed_clone_is_still_loaded(comfy, adapters, flux_fp8,
                                                                            comfy_cleanup):
    """The streamed clone's stand-in block lists stay on the shared model after it ran; CompileModelBlocks on
    the model (a second branch of the graph) then looks each block up and swaps compiled ones in through them.
    The blocks run compiled, the output equals the compiled model's alone, and the stand-ins register nothing."""
    streaming, _ = adapters
    blocks_compile = importlib.import_module("lowvram_kit.nodes.comfy_block_compile")
    torch._dynamo.reset()
    ref = sample(comfy, blocks_compile.compile_blocks(flux_fp8, backend="aot_eager"))
    comfy.model_management.unload_all_models()
    clone, session = streamed(adapters, flux_fp8, partial_budget(flux_fp8))
    sample(comfy, clone)   # loaded, and left loaded
    dm = flux_fp8.model.diffusion_model
    assert isinstance(dm.single_blocks, streaming.HiddenBlocks)
    compiled = blocks_compile.compile_blocks(flux_fp8, backend="aot_eager")
    seen = []

    def spy(executor, *args, **kwargs):   # inside ComfyUI's compile wrapper: the compiled blocks swapped in
        seen.append([type(b).__name__ for b in (*dm.double_blocks, *dm.single_blocks)])
        return executor(*args, **kwargs)

    from comfy.patcher_extension import WrappersMP
    compiled.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_spy", spy)
    out = sample(comfy, compiled)
    assert seen and all(set(names) == {"OptimizedModule"} for names in seen), seen
    assert torch.equal(out, ref)
    for blocks in (dm.double_blocks, dm.single_blocks):   # swapped back, never registered
        if isinstance(blocks, streaming.HiddenBlocks):
            assert not list(blocks.children()) and all(type(b).__name__ != "OptimizedModule" for b in blocks)
    comfy.model_management.unload_all_models()
    torch._dynamo.reset()


def test_unknown_model_class_is_named(adapters):
    streaming, _ = adapters

    class Dummy(torch.nn.Module):
        pass

    class FakePatcher:
        model = type("M", (), {"diffusion_model": Dummy()})()

        def clone(self):
            return self

    with pytest.raises(ValueError, match="Dummy"):
        streaming.stream_blocks(FakePatcher(), streaming.StreamingSettings(0, 0, 0, False))


def test_streaming_a_model_loaded_under_inference_mode_as_the_server_does(comfy, adapters, flux6_path, comfy_cleanup):
    """ComfyUI runs every node under torch.inference_mode(): the loader makes inference-tensor Parameters,
    and re-pointing them at normal slot views broke the next view of a weight ("Inference tensors do not
    track version counter") in the first real server run. The streamer now makes its buffers of the
    model's kind; the result must still equal the unstreamed model's, bit for bit."""
    from lowvram_kit.quant import QuantConfig

    _, loading = adapters
    with torch.inference_mode():
        model, _ = loading.load_fp8_model(str(flux6_path), loading.Fp8LoadConfig(QuantConfig()))
        assert next(model.model.diffusion_model.parameters()).is_inference()
        ref = sample(comfy, model)
        comfy.model_management.unload_all_models()
        clone, session = streamed(adapters, model, partial_budget(model))
        out = sample(comfy, clone)
        assert session.streamer is not None and session.streamer.copies > 0
    assert torch.equal(out, ref)
    comfy.model_management.unload_all_models()
    assert session.streamer is None


def test_an_auto_budget_keeps_the_last_plan_unless_much_more_is_free(comfy, adapters, flux_fp8, comfy_cleanup):
    """On auto, the next load for the same latent shape plans with the budget that ran when a little more is free
    (the parked host buffers then fit as they are: nothing is packed again), and anew when much more is."""
    streaming, _ = adapters
    ref = sample(comfy, flux_fp8)
    comfy.model_management.unload_all_models()
    clone, session = streamed(adapters, flux_fp8, 0)
    free = {"bytes": partial_budget(flux_fp8)}
    session.free_bytes = lambda device: free["bytes"]
    assert torch.equal(sample(comfy, clone), ref)
    first = session.streamer.plan
    comfy.model_management.unload_all_models()

    free["bytes"] = int(first.budget_bytes * 1.2)      # a little more free: the same plan, every group adopted
    assert torch.equal(sample(comfy, clone), ref)
    assert session.streamer.plan.budget_bytes == first.budget_bytes
    assert session.streamer.adopted_groups == len(first.streamed_groups) > 0
    comfy.model_management.unload_all_models()

    free["bytes"] = int(first.budget_bytes * 1.3)      # much more: planned with it
    assert torch.equal(sample(comfy, clone), ref)
    assert session.streamer.plan.budget_bytes == free["bytes"]
    comfy.model_management.unload_all_models()
