"""Every shipped workflow runs end to end in a headless ComfyUI 0.3.75 on tiny synthetic models (issue #8).

The UI file itself is converted (harness.workflow_api.ui_to_api against the server's /object_info), core
text-encoder loaders are swapped for the test loader of tiny encoders, and the graph is scaled down to one
step at 256x256 (harness.main.prepare_tiny). One server runs all of them, so the tiny models stay cached in
its RAM between workflows (ComfyUI reuses a loader's output while its inputs are unchanged); budget: ~10 min on 2 CPU cores. The LoRA workflow gets a small LoRA written here
with Z-Image's real key names, and the server log must not report a LoRA key it could not map.
"""
from __future__ import annotations

import tempfile
import time
import zlib
from pathlib import Path

import pytest
import torch

from harness.main import available_workflows, collect_images, load_workflow, prepare_tiny
from harness.paths import REPO_ROOT
from harness.server import ComfyServer, ServerConfig
from harness.synthetic.cache import default_models_dir
from harness.workflow_api import TEST_NODES_DIR, ui_to_api

SCALE_DOWN = {"width": 256, "height": 256, "steps": 1}
PROMPT_TIMEOUT_S = 400
# Z-Image tiny keeps the real width (3840, 30 heads of 128), so the LoRA below fits the real model too.
ZIMAGE_DIM, ZIMAGE_FFN, LORA_RANK = 3840, 10240, 4
# LoRA module (ComfyUI's generic "diffusion_model.<module>" key form) -> (out features, in features).
ZIMAGE_LORA_MODULES = {
    "diffusion_model.layers.0.attention.qkv": (3 * ZIMAGE_DIM, ZIMAGE_DIM),
    "diffusion_model.layers.0.attention.out": (ZIMAGE_DIM, ZIMAGE_DIM),
    "diffusion_model.layers.0.feed_forward.w1": (ZIMAGE_FFN, ZIMAGE_DIM),
}


def write_zimage_lora(path: Path) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out_f, in_f) in ZIMAGE_LORA_MODULES.items():
        tensors[f"{module}.lora_down.weight"] = (torch.randn(LORA_RANK, in_f, generator=g) * 0.01).to(torch.bfloat16)
        tensors[f"{module}.lora_up.weight"] = (torch.randn(out_f, LORA_RANK, generator=g) * 0.01).to(torch.bfloat16)
        tensors[f"{module}.alpha"] = torch.tensor(float(LORA_RANK))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def lora_names(ui: dict) -> list[str]:
    return [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "LoraLoaderModelOnly"]


@pytest.fixture(scope="module")
def models_dir() -> Path:
    root = default_models_dir("tiny")
    for name in available_workflows():
        for lora in lora_names(load_workflow(name)):
            if not (root / "loras" / lora).is_file():
                write_zimage_lora(root / "loras" / lora)
    return root


@pytest.fixture(scope="module")
def server(models_dir):
    with tempfile.TemporaryDirectory(prefix="lowvram-shipped-") as base:
        config = ServerConfig(base_dir=Path(base), models_dirs=(models_dir,), cpu=True,
                              extra_node_dirs=(REPO_ROOT / TEST_NODES_DIR,))
        with ComfyServer(config) as srv:
            yield srv


def test_every_family_and_tier_is_shipped():
    expected = {f"{family}_{tier}gb" for family, tiers in
                {"flux_dev": (8, 12, 16, 24), "sdxl": (12, 16, 24), "newbie": (12, 16, 24),
                 "z_image_turbo": (12, 16, 24)}.items() for tier in tiers}
    assert expected <= set(available_workflows())


@pytest.mark.parametrize("name", available_workflows())
def test_shipped_workflow_runs_on_tiny_models(name, server, tmp_path):
    ui = load_workflow(name)
    notes = [n for n in ui["nodes"] if n["type"] == "MarkdownNote"]
    assert notes and f"{name.rsplit('_', 1)[1][:-2]} GB card" in notes[0]["widgets_values"][0]
    api = ui_to_api(ui, server.object_info())
    # A seed of its own: tiers whose graphs differ only in their note would otherwise be answered from
    # ComfyUI's cache without sampling at all.
    prepare_tiny(api, {**SCALE_DOWN, "seed": zlib.crc32(name.encode())})
    log_start = server.log_path.stat().st_size
    t0 = time.monotonic()
    entry = server.wait(server.queue(api), timeout_s=PROMPT_TIMEOUT_S)
    print(f"{name}: {time.monotonic() - t0:.1f} s")
    images = collect_images(entry, server.base_dir / "output", tmp_path)
    assert images and all(p.stat().st_size > 0 for p in images)
    with open(server.log_path, errors="replace") as f:
        f.seek(log_start)
        log = f.read()
    assert "lora key not loaded" not in log, log[-4000:]
