"""bench.core_graph: a shipped graph rewritten to ComfyUI core nodes, links followed through removed nodes."""
from bench.core_graph import pack_nodes_left, to_core

# A Flux 8 GB-shaped API graph: loader -> offload -> guard -> sampler; LazyVAEDecode at the end.
GRAPH = {
    "1": {"class_type": "Float8DiTLoader", "inputs": {"model_name": "flux1-dev.safetensors", "fp8_format": "e4m3fn"}},
    "2": {"class_type": "ChunkedOffloadUNet", "inputs": {"model": ["1", 0], "vram_budget_gb": 0.0}},
    "3": {"class_type": "VRAMGuard", "inputs": {"model": ["2", 0], "policy": "adapt"}},
    "4": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 42, "latent_image": ["5", 0]}},
    "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
    "6": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
    "7": {"class_type": "LazyVAEDecode", "inputs": {"samples": ["4", 0], "vae": ["6", 0], "tiling": "auto"}},
    "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "x"}},
}


def test_pack_nodes_are_replaced_and_links_follow_removed_nodes():
    core = to_core(GRAPH)
    assert set(core) == {"1", "4", "5", "6", "7", "8"}
    assert core["1"] == {"class_type": "UNETLoader", "_meta": {"title": "UNETLoader (fp8_e4m3fn)"},
                         "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "fp8_e4m3fn"}}
    assert core["4"]["inputs"]["model"] == ["1", 0]          # through the guard and the offload node
    assert core["7"]["class_type"] == "VAEDecode" and core["7"]["inputs"] == {"samples": ["4", 0], "vae": ["6", 0]}
    assert pack_nodes_left(core, {"Float8DiTLoader", "ChunkedOffloadUNet", "VRAMGuard", "LazyVAEDecode"}) == []
    assert GRAPH["4"]["inputs"]["model"] == ["3", 0], "the input graph must not change"


def test_newbie_dit_loader_becomes_a_default_unet_loader():
    core = to_core({"1": {"class_type": "NewBieDiTLoader", "inputs": {"unet_name": "n.safetensors", "weight_dtype": "default"}}})
    assert core["1"]["inputs"] == {"unet_name": "n.safetensors", "weight_dtype": "default"}


def test_a_compile_node_is_inserted_after_the_offload_node_with_its_consumers_rewired():
    import copy

    from bench.workflows_e2e import insert_after

    api = copy.deepcopy(GRAPH)
    new = insert_after(api, "ChunkedOffloadUNet", "CompileModelBlocks", {"mode": "default"})
    assert new == "9" and api["9"] == {"class_type": "CompileModelBlocks", "inputs": {"model": ["2", 0], "mode": "default"}}
    assert api["3"]["inputs"]["model"] == ["9", 0]   # VRAMGuard now takes the compiled clone
    assert api["4"]["inputs"]["model"] == ["3", 0]
