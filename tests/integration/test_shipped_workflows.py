"""Every shipped workflow runs end to end in a headless ComfyUI 0.3.75 on tiny synthetic models (issue #8).

The UI file itself is converted (harness.workflow_api.ui_to_api against the server's /object_info), core
text-encoder loaders are swapped for the test loader of tiny encoders, and the graph is scaled down to one
step at 256x256 (harness.main.prepare_tiny). One server runs all of them, so the tiny models stay cached in
its RAM between workflows (ComfyUI reuses a loader's output while its inputs are unchanged); budget: ~10 min
on 2 CPU cores. The LoRA workflow's file is a synthetic stand-in from the registry (harness/synthetic/lora.py:
the real file's keys and rank, the tiny model's blocks), and the server log must not report a LoRA key it
could not map. Every sampler runs behind a VRAMGuard (issue #6).
"""
from __future__ import annotations

import tempfile
import time
import zlib
from pathlib import Path

import pytest

from harness.main import available_workflows, collect_images, load_workflow, prepare_tiny
from harness.paths import REPO_ROOT
from harness.server import ComfyServer, ServerConfig
from harness.synthetic import REGISTRY
from harness.synthetic.cache import default_models_dir
from harness.workflow_api import TEST_NODES_DIR, ui_to_api

SCALE_DOWN = {"width": 256, "height": 256, "steps": 1}
PROMPT_TIMEOUT_S = 400


def lora_loaders(ui: dict) -> list[dict]:
    return [n for n in ui["nodes"] if n["type"] == "LoraLoaderModelOnly"]


@pytest.fixture(scope="module")
def models_dir() -> Path:
    # prepare_tiny writes each workflow's stand-ins here (the LoRA included) before its prompt is queued.
    return default_models_dir("tiny")


@pytest.fixture(scope="module")
def server(models_dir):
    with tempfile.TemporaryDirectory(prefix="lowvram-shipped-") as base:
        config = ServerConfig(base_dir=Path(base), models_dirs=(models_dir,), cpu=True,
                              extra_node_dirs=(REPO_ROOT / TEST_NODES_DIR,))
        with ComfyServer(config) as srv:
            yield srv


@pytest.mark.parametrize("name", available_workflows())
def test_the_sampler_runs_behind_a_vram_guard(name):
    ui = load_workflow(name)
    nodes = {n["id"]: n for n in ui["nodes"]}
    source = {link[0]: link[1] for link in ui["links"]}          # link id -> source node id
    (sampler,) = [n for n in ui["nodes"] if n["type"] == "KSampler"]
    model_link = next(i["link"] for i in sampler["inputs"] if i["name"] == "model")
    guard = nodes[source[model_link]]
    assert guard["type"] == "VRAMGuard"
    assert guard["widgets_values"] == [0.0, 0.5, "adapt", 2, True]   # budget, headroom, policy, retries, report
    assert "VRAMGuard" in next(n for n in ui["nodes"] if n["type"] == "MarkdownNote")["widgets_values"][0]


def test_lora_loaders_name_a_downloadable_file_with_a_synthetic_stand_in():
    stand_ins = {(e.folder, e.filename) for e in REGISTRY.values()}
    loaders = [n for name in available_workflows() for n in lora_loaders(load_workflow(name))]
    assert loaders
    for node in loaders:
        (model,) = node["properties"]["models"]
        assert model["name"] == node["widgets_values"][0] and model["url"].endswith("/" + model["name"])
        assert ("loras", model["name"]) in stand_ins and model["directory"] == "loras"


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


@pytest.mark.parametrize("name", available_workflows())
def test_the_note_carries_the_measured_end_to_end_figures(name):
    # Written by harness.shipped_workflows from bench/results/workflows_e2e_*.json (issue #8: settings and
    # claims come from measurements): ours and ComfyUI core at the workflow's tier.
    from harness.shipped_workflows import measured_line, measured_rows

    note = next(n for n in load_workflow(name)["nodes"] if n["type"] == "MarkdownNote")["widgets_values"][0]
    line = measured_line(name, measured_rows())
    assert line.startswith("End to end on an H200 left") and line in note
