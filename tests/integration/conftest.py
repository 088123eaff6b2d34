"""Session fixtures shared by the integration tests: ComfyUI imported in-process on the CPU, and tiny
synthetic model files written once per session (and reused across sessions while their metadata and
tensor table still match; set LOWVRAM_SYNTHETIC_DIR to use another folder)."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from harness.synthetic import cache


@pytest.fixture(scope="session")
def comfy():
    from harness.comfy_inproc import import_comfy

    try:
        return import_comfy(cpu=True)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def synthetic_dir() -> Path:
    return Path(os.environ.get("LOWVRAM_SYNTHETIC_DIR") or cache.default_models_dir("tiny"))


@pytest.fixture(scope="session")
def tiny_model(synthetic_dir):
    """tiny_model(name) -> path of the tiny synthetic file, written on first use."""
    return lambda name: cache.ensure(name, "tiny", synthetic_dir, device="cpu")


@pytest.fixture
def comfy_cleanup(comfy):
    """Unload whatever a test loaded through ComfyUI so the next one starts with free RAM."""
    yield
    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


@pytest.fixture(scope="session")
def tiny_flux_patcher(comfy):
    """A factory: tiny_flux_patcher(depth_single_blocks) -> a fresh in-process Flux ModelPatcher."""
    return _tiny_flux_patcher


def _tiny_flux_patcher(depth_single_blocks: int):
    """ComfyUI's own Flux class at hidden size 32 (fp32), 1 double block + `depth_single_blocks` single blocks,
    built in-process with seeded random weights (no file, fast steps), in a ModelPatcher."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    cfg = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=64,
               hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=depth_single_blocks,
               axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
    mc = comfy.supported_models.Flux(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())
