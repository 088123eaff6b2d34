"""bench.vramguard_calibrate end to end on the CPU (`--smoke`: tiny synthetic Flux-dev and NewBie, 64 px,
batch 1 and 2, ComfyUI --cpu in-process): the guard's prediction for every row, the decode rows, the
fault-injection runs (simulated OOM on the CPU) and the repeat run, the table and the result JSON. It says
nothing about accuracy: the CPU has no NVML peak to compare with (the GPU run does that).
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


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    comfy = default_comfyui_path()
    if comfy is None:
        pytest.skip("no ComfyUI tree: set COMFYUI_PATH or run scripts/bootstrap.sh")
    out = tmp_path_factory.mktemp("bench_vramguard")
    env = {**os.environ, "COMFYUI_PATH": comfy}
    cmd = [sys.executable, "-m", "bench.vramguard_calibrate", "--smoke", "--families", "flux,newbie",
           "--fault-family", "flux", "--faults", "2", "--repeat", "3", "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return proc, sorted(out.glob("vramguard_calibration_smoke_*.json")), out


def test_smoke_exits_cleanly_and_prints_the_table_last(smoke_run):
    proc, files, out = smoke_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    tail = proc.stdout[-4000:]
    assert "| kind" in tail and "predicted GiB" in tail and "faults:" in tail and "results:" in tail
    assert [p.name for p in out.iterdir()] == [files[0].name]


def test_smoke_result_json(smoke_run):
    _, files, _ = smoke_run
    res = json.loads(files[0].read_text())
    env = res["environment"]
    for key in ("device_name", "torch", "python", "date", "command"):
        assert env.get(key), key
    assert "bench.vramguard_calibrate" in env["command"] and res["smoke"] is True
    assert res["settings"]["sizes"] == [64] and res["settings"]["batches"] == [1, 2]
    assert res["calibration"]["activations"]["flux"].startswith("bench/results/comfy_core_flux_anchor")
    rows = res["rows"]
    sampling = [r for r in rows if r["kind"] == "sampling"]
    assert [(r["family"], r["batch"]) for r in sampling] == [("flux", 1), ("flux", 2), ("newbie", 1), ("newbie", 2)]
    for r in sampling:
        assert r["predicted_gib"] > 0 and r["verdict"] == "fits" and r["placement"] == "cpu", r
        assert r["peak_gib"] is None and r["peak_source"] == "none"      # no CUDA: not measured, not faked
    flux1, flux2 = sampling[0], sampling[1]
    assert flux2["predicted_gib"] == pytest.approx(2 * flux1["predicted_gib"], rel=1e-3)   # batch scales
    assert sampling[2]["cfg_batch"] == 2 and flux1["cfg_batch"] == 1     # NewBie's cfg 4.5 batches cond+uncond
    decode = [r for r in rows if r["kind"] == "decode"]
    assert len(decode) == 4 and all(r["predicted_gib"] > 0 for r in decode)
    faults = next(r for r in rows if r["kind"] == "faults")
    assert faults["ok"] and faults["equal"] == 2 and faults["retried"] == 2 and faults["real_oom"] is False
    repeat = next(r for r in rows if r["kind"] == "repeat")
    assert repeat["ok"] and repeat["prompts"] == 3 and repeat["measure"] == "host RSS"
    assert res["summary"]["faults_ok"] and res["summary"]["repeat_ok"] and res["summary"]["rows_checked"] == 0
