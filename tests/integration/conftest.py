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
