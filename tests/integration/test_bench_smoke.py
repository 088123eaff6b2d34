"""The benchmark harness end to end on the CPU: `python -m bench.anchor --smoke` (tiny synthetic Flux-dev,
64x64, 2 steps, ComfyUI with --cpu, one process per weight mode; the bf16 and fp8_fast modes, since fp8
storage without fp8 matmul is the slowest path on a CPU and adds nothing the other two do not cover).
About a minute on two cores.

It checks that the harness imports ComfyUI the way the GPU run does, that `--fast fp8_matrix_mult` reaches
the mode that asks for it (and only that one), and that the result JSON carries what benchmarking.md
requires; it says nothing about speed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.anchor import MODES, default_comfyui_path

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.comfy
SMOKE_MODES = ("bf16", "fp8_fast")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    comfy = default_comfyui_path()
    if comfy is None:
        pytest.skip("no ComfyUI tree: set COMFYUI_PATH or run scripts/bootstrap.sh")
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "COMFYUI_PATH": comfy}
    proc = subprocess.run([sys.executable, "-m", "bench.anchor", "--smoke", "--modes", ",".join(SMOKE_MODES),
                           "--out-dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    files = sorted(out.glob("comfy_core_flux_anchor_smoke_*.json"))
    return proc, files, out


def test_smoke_exits_cleanly_and_prints_the_table(smoke_run):
    proc, files, out = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| mode" in proc.stdout and "results:" in proc.stdout
    assert len(files) == 1, list(out.iterdir())
    assert not list(out.glob("*.rows.jsonl")), "the temporary rows file should be removed"


def test_smoke_result_json(smoke_run):
    _, files, _ = smoke_run
    res = json.loads(files[0].read_text())
    env = res["environment"]
    for key in ("device_name", "torch", "comfyui_version", "python", "date", "command"):
        assert env.get(key), key
    assert env["comfyui_version"].count(".") == 2
    assert "bench.anchor" in env["command"] and "--smoke" in env["command"]
    assert res["smoke"] is True and res["workload"]["width"] == 64 and res["workload"]["steps"] == 2

    rows = [r for r in res["rows"] if not r["repeat"]]
    assert [r["mode"] for r in rows] == list(SMOKE_MODES)
    for r in rows:
        assert r["budget"] == "unlimited" and r["latent_finite"] is True, r
        assert r["steps_done"] == 2 and len(r["step_s"]) == 2 and r["s_per_it"] > 0, r
        assert r["s_per_it"] == pytest.approx(r["step_s"][1])     # step 1 (model load) is dropped
        assert r["load_s"] > 0 and r["host_rss_peak_gib"] > 0
        assert r["peak_gib"] is None and r["peak_source"] == "none"   # no CUDA: not measured, not faked
    assert rows[0]["ratio_to_resident_bf16"] == pytest.approx(1.0)
    assert res["summary"]["anchor_rows_checked"] == 0      # a CPU smoke run is not compared to the H200


def test_fast_flag_reaches_only_the_fast_mode(smoke_run):
    _, files, _ = smoke_run
    modes = json.loads(files[0].read_text())["modes"]
    assert modes["fp8_fast"]["comfy_fast"] == ["fp8_matrix_mult"]
    assert modes["bf16"]["comfy_fast"] == []
    assert modes["fp8_fast"]["weight_dtype"] == MODES["fp8_fast"].weight_dtype == "fp8_e4m3fn_fast"
    assert all(m["exit_code"] == 0 for m in modes.values())


def test_docstring_examples_of_the_generic_pieces():
    import doctest

    import bench.ballast
    import bench.table
    for mod in (bench.ballast, bench.table):
        failed, attempted = doctest.testmod(mod)
        assert attempted > 0 and failed == 0, mod.__name__


def test_peak_sampler_without_cuda_measures_host_only(monkeypatch):
    import torch

    from bench.nvml_peak import PeakSampler
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with PeakSampler("cuda", interval_s=0.001) as s:
        block = bytearray(64 << 20)   # 64 MiB touched: RSS must rise by about that much
        block[::4096] = b"\1" * len(block[::4096])
    r = s.reading
    assert r.source == "none" and r.peak_bytes is None and "no CUDA" in r.note
    assert r.samples >= 1 and r.host_rss_peak_bytes >= 64 << 20
