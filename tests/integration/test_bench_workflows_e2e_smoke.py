"""`python -m bench.workflows_e2e --smoke --warm-start` on the CPU: one shipped workflow, our graph and its
core rewrite, in a real headless ComfyUI with tiny synthetic models. It checks the harness (server,
conversion, timing from websocket events, warm-up, result JSON), not speed: the GPU run is what measures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.anchor import default_comfyui_path

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.comfy


def test_workflows_e2e_smoke_measures_ours_and_core(tmp_path):
    comfy = default_comfyui_path()
    if comfy is None:
        pytest.skip("no ComfyUI tree: set COMFYUI_PATH or run scripts/bootstrap.sh")
    env = {**os.environ, "COMFYUI_PATH": comfy}
    proc = subprocess.run([sys.executable, "-m", "bench.workflows_e2e", "--smoke", "--workflows", "sdxl_12gb",
                           "--parts", "tier,core", "--warm-start", "--out-dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [result_file] = tmp_path.glob("workflows_e2e_smoke_*.json")
    result = json.loads(result_file.read_text())
    prompts = [r for r in result["rows"] if r.get("kind") == "prompt"]
    assert [(r["graph"], r["prompt"]) for r in prompts] == [("ours", "first"), ("ours", "repeat"),
                                                           ("core", "first"), ("core", "repeat")], result["rows"]
    for r in prompts:
        assert "error" not in r, r
        assert r["images"] == 1 and r["steps"] == 4 and r["s_per_it"] > 0
        assert r["stages_s"]["sampling"] > 0 and r["prompt_s"] >= r["stages_s"]["sampling"]
        assert len(r["image_pixels_sha256"]) == 1 and len(r["image_pixels_sha256"][0]) == 64
    assert "loading" in prompts[0]["stages_s"] and "loading" not in prompts[1]["stages_s"], \
        "the repeat prompt (next seed) must reuse the loaded models"
    # one seed, two graphs: the digests tell images apart (the next seed gives another image)
    assert prompts[0]["image_pixels_sha256"] != prompts[1]["image_pixels_sha256"]
    assert "sdxl_12gb" in proc.stdout and "wrote" in proc.stdout
    # the pack's own log lines of each of our prompts travel with the row (VRAMGuard's decision at least)
    assert any("VRAMGuard" in line for line in prompts[0]["pack_log"]), prompts[0]["pack_log"]
    # --warm-start: each graph ran once in a throwaway server before the measured one started
    assert all(r["kernel_cache"] == "warm" for r in prompts)
    assert all(r["warmup_prompt_s"] > 0 for r in prompts if r["prompt"] == "first")
