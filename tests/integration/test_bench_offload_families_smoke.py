"""bench.offload_families end to end on the CPU (`--smoke`: the tiny synthetic NewBie DiT and SDXL checkpoint,
2 steps, ComfyUI with --cpu, no ballast): per family the ComfyUI core process (every weight dtype in it) and
ours (Float8DiTLoader's route, SDXL's fp16 UNet), each mode resident, one row streamed by ChunkedOffloadUNet
on the CPU within a byte budget that leaves about half the blocks on the host, the floors and the result
JSON. It says nothing about speed. About 2 minutes on two idle cores (most of it the SDXL UNet, 700M
parameters even at its tiny size, and four ComfyUI imports).

The floor arithmetic for ComfyUI core's partially loaded rows is checked on made-up rows.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.anchor import default_comfyui_path
from bench.offload_families import FAMILIES
from bench.offload_rows import PINNED_H2D, add_floors
from bench.workload import FAMILY_INPUTS

REPO = Path(__file__).resolve().parents[2]
GiB = 1 << 30


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    comfy = default_comfyui_path()
    if comfy is None:
        pytest.skip("no ComfyUI tree: set COMFYUI_PATH or run scripts/bootstrap.sh")
    out = tmp_path_factory.mktemp("bench_offload_families")
    cmd = [sys.executable, "-m", "bench.offload_families", "--smoke", "--out-dir", str(out)]
    if os.environ.get("LOWVRAM_SYNTHETIC_DIR"):   # the folder the other integration tests use
        cmd += ["--models-dir", os.environ["LOWVRAM_SYNTHETIC_DIR"]]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "COMFYUI_PATH": comfy}, capture_output=True,
                          text=True, timeout=1200)
    return proc, out


def result(out: Path, family: str) -> dict:
    files = sorted(out.glob(f"offload_{family}_smoke_*.json"))
    assert len(files) == 1, [p.name for p in out.iterdir()]
    return json.loads(files[0].read_text())


@pytest.mark.comfy
def test_smoke_exits_cleanly_prints_the_table_and_keeps_only_the_results(smoke_run):
    proc, out = smoke_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    tail = proc.stdout[-4000:]
    assert "| family" in tail and "| floor s" in tail and tail.count("results: ") == len(FAMILIES)
    assert sorted(p.name.split("_smoke_")[0] for p in out.iterdir()) == sorted(f"offload_{f}" for f in FAMILIES)


@pytest.mark.comfy
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_mode_has_its_rows_ratio_and_floor(smoke_run, family):
    res = result(smoke_run[1], family)
    fb = FAMILIES[family]
    assert res["smoke"] is True and res["family"] == family and res["reference"] == fb.reference
    assert res["exit_codes"] == {"core": 0, "ours": 0}
    for key in ("device_name", "torch", "comfyui_version", "python", "date", "command"):
        assert res["environment"].get(key), key
    assert "bench.offload_families" in res["environment"]["command"]
    w = res["workload"]
    assert w["family"] == family and w["steps"] == 2 and w["cfg"] == FAMILY_INPUTS[family].cfg > 1

    rows = res["rows"]
    resident = {r["mode"]: r for r in rows if not r.get("streamed")}
    assert sorted(resident) == sorted(m for m, _ in fb.core + fb.ours), [(r["mode"], r["budget"]) for r in rows]
    for r in rows:
        assert "error" not in r, r
        assert r["steps_done"] == 2 and r["s_per_it"] > 0 and r["latent_finite"] is True, r
        # CFG: cond and uncond in one forward of batch 2 per step (the floor counts transfers per pass)
        assert r["pass_batches"] == [2] and r["passes_per_step"] == 1.0, r
        assert r["ratio"] > 0 and r["floor_s"] >= r["floor_compute_s"] > 0, r
    assert resident[fb.reference]["ratio"] == 1.0
    for r in resident.values():
        assert r["floor_bound"] == "compute" and r["floor_s"] == r["s_per_it"], r   # nothing streamed

    (streamed,) = [r for r in rows if r.get("streamed")]
    mode = fb.ours[0][0]
    assert streamed["mode"] == mode and streamed["stream_budget_bytes"] > 0 and streamed["copies"] > 0
    assert 0 < streamed["streamed_bytes"] and "Block streaming plan" in streamed["plan"]
    assert streamed["floor_compute_s"] == resident[mode]["s_per_it"]
    assert streamed["floor_transfer_s"] == pytest.approx(streamed["streamed_bytes"] / PINNED_H2D)

    loads = {r["what"]: r for r in res["records"] if r["kind"] == "load"}
    assert sorted(loads) == sorted(m for m, _ in fb.ours) and all(r["seconds"] > 0 for r in loads.values())
    assert loads["ours_fp8"]["report"].startswith(f"{family}: ")   # Float8DiTLoader saw the right family


def test_floor_of_comfyui_core_counts_what_it_left_on_the_host_for_every_pass():
    rows = [{"kind": "row", "mode": "comfy_fp16", "budget": "unlimited", "budget_gib": None, "s_per_it": 0.05},
            {"kind": "row", "mode": "comfy_fp16", "budget": "4", "budget_gib": 4.0, "s_per_it": 0.11,
             "model_gib": 4.8, "loaded_gib": 2.8, "passes_per_step": 2.0},
            {"kind": "row", "mode": "ours_fp8", "budget": "4", "budget_gib": 4.0, "s_per_it": 0.2, "streamed": True,
             "error": "RuntimeError: boom"}]
    core, ours = add_floors(rows, "comfy_fp16")[1:]
    assert core["floor_transfer_s"] == pytest.approx(2 * 2.0 * GiB / PINNED_H2D)   # 2 passes: CFG split
    assert core["floor_bound"] == "transfer" and core["floor_s"] == core["floor_transfer_s"]
    assert core["ratio"] == pytest.approx(2.2) and core["floor_ratio"] == pytest.approx(core["floor_s"] / 0.05)
    # A failed streamed row of a mode never measured resident: no plan, no compute time, no floor.
    assert ours["floor_s"] is None and ours["floor_bound"] is None and ours["ratio"] == pytest.approx(4.0)


def test_docstring_examples_of_the_shared_pieces():
    import doctest

    import bench.offload_rows
    import bench.workload
    for mod in (bench.offload_rows, bench.workload):
        failed, attempted = doctest.testmod(mod)
        assert attempted > 0 and failed == 0, mod.__name__
