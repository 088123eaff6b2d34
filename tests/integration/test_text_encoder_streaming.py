"""ChunkedOffloadTextEncoder's adapter inside ComfyUI (in-process, CPU): T5-XXL (Flux's pair) and Qwen3-4B
(Z-Image) encode bit-identically with their blocks streamed, with and without a weight patch (LoRA), and an
eviction copies nothing back (the streamer is parked, its host buffers kept for the next load).

On the CPU the "device" is the host (session.attach_on_cpu): resident groups stay put and streamed groups
are copied host to host, which exercises object patches, hidden block lists, ON_LOAD/ON_DETACH, accounting
and patches; the GPU benchmark (bench.workflows_e2e, flux_dev_8gb) times the real thing.
"""
import importlib

import pytest
import torch

pytestmark = pytest.mark.comfy
MiB = 1 << 20
PROMPT = "a lighthouse on a cliff at dusk, volumetric light"


@pytest.fixture(scope="module")
def te_streaming(comfy):
    from harness.pack_import import import_pack

    import_pack()
    return importlib.import_module("lowvram_kit.nodes.comfy_te_streaming")


def load_clip(comfy, tiny_model, names, clip_type):
    from harness.synthetic.cache import merged_model_options

    paths = [str(tiny_model(n)) for n in names]
    return comfy.sd.load_clip(paths, clip_type=comfy.sd.CLIPType[clip_type], model_options=merged_model_options(paths))


def encode(clip):
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    return cond[0][0], cond[0][1].get("pooled_output")


def streamed(te_streaming, clip, share=0.5, slots=3):
    """A streamed clone whose budget holds `slots` transfer slots and about `share` of the block bytes resident
    (the rest streams)."""
    from lowvram_kit.offload import DEFAULT_MARGIN_BYTES, block_nbytes

    probe = te_streaming.TextEncoderStreamingSession(clip.clone().patcher,
                                                     te_streaming.TextEncoderStreamingSettings(1))
    blocks = block_nbytes(probe.blocks)
    budget = te_streaming.ENCODE_ACTIVATION_BYTES + DEFAULT_MARGIN_BYTES + int(share * sum(blocks)) + slots * max(blocks)
    clone, session = te_streaming.stream_text_encoder(clip, te_streaming.TextEncoderStreamingSettings(budget, False))
    session.attach_on_cpu = True
    return clone, session


@pytest.mark.parametrize("names,clip_type,share", [(("clip-l", "t5xxl"), "FLUX", 0.5),
                                                   (("qwen3-4b",), "STABLE_DIFFUSION", 0.0)])   # 3 tiny layers
def test_streamed_encoder_is_bit_identical_and_eviction_parks_it(comfy, te_streaming, tiny_model, names, clip_type,
                                                                  share, comfy_cleanup):
    clip = load_clip(comfy, tiny_model, names, clip_type)
    ref = encode(clip)
    comfy.model_management.unload_all_models()
    clone, session = streamed(te_streaming, clip, share=share, slots=2)
    assert len(session.lists) == len(names), list(session.lists)   # every encoder's stack (CLIP-L's layers too)
    out = encode(clone)
    assert session.streamer is not None and session.streamer.plan.streamed_groups, session.streamer.plan.describe()
    assert session.streamer.copies > 0
    assert all(torch.equal(a, b) for a, b in zip(out, ref) if a is not None)
    # ComfyUI counts the streamer's device bytes as loaded weights of the encoder, also after a later load of the
    # rest, which sets the count to what ComfyUI itself loaded just before ON_LOAD.
    model = clone.patcher.model
    assert model.model_loaded_weight_memory >= session.streamer.device_bytes > 0
    model.model_loaded_weight_memory = 1234
    session.on_load(clone.patcher, session.streamer.device)
    assert model.model_loaded_weight_memory == 1234 + session.streamer.device_bytes
    comfy.model_management.unload_all_models()
    assert session.streamer is None and session.blocks[0] in te_streaming.PARKED_HOSTS
    # Loaded again: it streams from the parked buffers, nothing is packed a second time.
    assert all(torch.equal(a, b) for a, b in zip(encode(clone), ref) if a is not None)
    assert session.streamer.adopted_groups == len(session.streamer.plan.streamed_groups) > 0
    comfy.model_management.unload_all_models()
    assert all(torch.equal(a, b) for a, b in zip(encode(clip), ref) if a is not None)   # the original is untouched


def test_a_weight_patch_after_the_node_gives_the_patched_conditioning(comfy, te_streaming, tiny_model, comfy_cleanup):
    """A LoRA loader after the node clones the streamed CLIP and adds patches to block weights: resident blocks
    get them merged at attach and streamed ones per call, as ComfyUI's own load computes them."""
    clip = load_clip(comfy, tiny_model, ("clip-l", "t5xxl"), "FLUX")
    g = torch.Generator().manual_seed(7)
    state = clip.cond_stage_model.state_dict()
    keys = [k for k in state if k.startswith("t5xxl.transformer.encoder.block.") and k.endswith("SelfAttention.q.weight")]
    assert len(keys) >= 2
    patches = {k: (torch.randn(state[k].shape, generator=g).to(state[k].dtype) * 0.05,) for k in keys}

    plain = clip.clone()
    plain.add_patches(patches, 1.0)
    ref = encode(plain)
    comfy.model_management.unload_all_models()
    assert not torch.equal(ref[0], encode(clip)[0])   # the patch changes the conditioning
    comfy.model_management.unload_all_models()

    stream_clone, session = streamed(te_streaming, clip)
    patched = stream_clone.clone()
    patched.add_patches(patches, 1.0)
    out = encode(patched)
    plan = session.streamer.plan
    assert plan.resident_blocks and plan.streamed_groups, plan.describe()   # both routes ran
    assert torch.equal(out[0], ref[0])
    comfy.model_management.unload_all_models()
    assert all(not m.weight_function for m in session.block_modules() if hasattr(m, "weight_function"))


def test_an_encoder_without_a_known_stack_is_named(comfy, te_streaming, tiny_model, monkeypatch):
    # Every encoder ComfyUI 0.3.75 ships has a known stack; CLIP-L stands for one that has none.
    monkeypatch.setattr(te_streaming, "STREAMED_STACKS", {"T5Stack": "block", "Llama2_": "layers"})
    clip = load_clip(comfy, tiny_model, ("clip-l",), "STABLE_DIFFUSION")
    with pytest.raises(te_streaming.NoStreamableBlocks, match="SD1ClipModel.*Remove the node"):
        te_streaming.stream_text_encoder(clip, te_streaming.TextEncoderStreamingSettings(0))


def test_the_node_applied_twice_streams_once(comfy, te_streaming, tiny_model, comfy_cleanup):
    clip = load_clip(comfy, tiny_model, ("clip-l", "t5xxl"), "FLUX")
    ref = encode(clip)
    comfy.model_management.unload_all_models()
    first, s1 = streamed(te_streaming, clip)
    second, s2 = streamed(te_streaming, first)
    assert torch.equal(encode(second)[0], ref[0])
    assert s2.streamer is not None and s1.streamer is None
    assert s2.blocks == s1.blocks   # the same blocks, seen through the first node's stand-ins
