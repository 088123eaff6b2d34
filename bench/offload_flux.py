"""Issue #4's benchmark: ChunkedOffloadUNet on Flux-dev at simulated 12/8/6/4 GiB cards, beside ComfyUI core
at the same budgets, all in one run, ratios to resident bf16 ComfyUI.

    COMFYUI_PATH=... python -m bench.offload_flux --models-dir /tmp/models --out-dir DIR [--budgets 12,8,6,4]
    python -m bench.offload_flux --smoke        # CPU: tiny model, 64x64, checks the harness only

Processes (each imports ComfyUI with its own flags): ComfyUI core via bench.comfy_core_flux (bf16 resident
= the 1.00 reference and bf16 at 12 GiB; fp8 storage and fp8 with --fast fp8_matrix_mult at each budget),
and ours via `--ours` here: Float8DiTLoader (per-channel fp8, fp8 matmul) + ChunkedOffloadUNet with budget
auto (the ballast leaves exactly the budget free), and bf16 weights + ChunkedOffloadUNet at 12 GiB.
Each of our rows records the plan and its floor: max(resident compute time, streamed bytes / 55.6 GB/s).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .anchor import ensure_model
from .comfy_core_flux import FluxWorkload, import_comfy, make_inputs, sample_once
from .results import RESULTS_DIR, device_environment, write_json

PINNED_H2D = 55.6e9  # bytes/s, the anchor machine's pinned host->device bandwidth (benchmarking.md)


def core_rows(model: Path, rows: Path, budgets: list[str], steps: int, smoke: bool, modes: list[str]) -> None:
    """ComfyUI core in its own processes (flags differ), appending JSON lines to `rows`."""
    plans = [("bf16", "default", [], ["unlimited"] + ([] if smoke else ["12"])),
             ("fp8", "fp8_e4m3fn", [], budgets),
             ("fp8_fast", "fp8_e4m3fn_fast", ["--fast", "fp8_matrix_mult"], budgets)]
    for mode, dtype, flags, mode_budgets in plans:
        if mode not in modes:
            mode_budgets = mode_budgets[:1] if mode == "bf16" else []  # the 1.00 reference is always measured
        if not mode_budgets:
            continue
        cmd = [sys.executable, "-m", "bench.comfy_core_flux", "--model", str(model), "--weight-dtype", dtype,
               "--mode", f"comfy_{mode}", "--budgets", ",".join(mode_budgets), "--rows-out", str(rows),
               "--steps", str(steps)] + (["--width", "64", "--height", "64"] if smoke else [])
        subprocess.run(cmd + ["--"] + flags + (["--cpu"] if smoke else []), check=False)


def ours(model_path: str, rows_path: str, budgets: list[str], steps: int, smoke: bool, act_quants: list[str]) -> None:
    """Our rows, in this process: load once per weight kind, stream at each budget (and each activation
    quantizer of quant.matmul.Fp8MatmulOptions)."""
    import torch

    comfy_args, mm, comfy_sample, _fp, _nodes = import_comfy(os.environ["COMFYUI_PATH"], ["--cpu"] if smoke else [])
    from harness.pack_import import import_pack

    import_pack()
    streaming = importlib.import_module("lowvram_kit.nodes.comfy_block_streaming")
    loading = importlib.import_module("lowvram_kit.nodes.comfy_fp8_loading")
    from lowvram_kit.quant import QuantConfig

    device = mm.get_torch_device()
    w = FluxWorkload(steps=steps, **({"width": 64, "height": 64} if smoke else {}))
    inputs = make_inputs(w)
    out = open(rows_path, "a")

    def emit(row):
        out.write(json.dumps(row) + "\n")
        out.flush()

    def run(model, mode: str, budget: str):
        gib = None if budget == "unlimited" else float(budget)
        clone, session = streaming.stream_blocks(model, streaming.StreamingSettings(0, 0, 0, True))
        target = model if gib is None else clone
        row = sample_once(target, w, inputs, gib, device, mm, comfy_sample)
        row.update(mode=mode, kind="row")
        if gib is not None and session.streamer is not None:
            plan = session.streamer.plan
            row.update(plan=session.plan_text, streamed_gib=plan.streamed_bytes / 2**30,
                       resident_gib=plan.resident_bytes / 2**30, slot_gib=plan.slot_bytes / 2**30,
                       transfer_floor_s=plan.streamed_bytes / PINNED_H2D, copies=session.streamer.copies)
        emit(row)
        print(f"[offload] {mode} {budget}: {row.get('s_per_it')} s/it, peak {row.get('peak_gib')}", flush=True)

    from lowvram_kit.quant.matmul import Fp8MatmulOptions, set_fp8_matmul_options

    t0 = time.perf_counter()
    fp8, report = loading.load_fp8_model(model_path, loading.Fp8LoadConfig(QuantConfig(compute="fp8")))
    emit({"kind": "load", "what": "ours_fp8", "seconds": time.perf_counter() - t0, "report": report.text()})
    for act_quant in act_quants:
        set_fp8_matmul_options(Fp8MatmulOptions(act_quant=act_quant))
        suffix = "" if act_quant == "eager" else f"_{act_quant}"
        for budget in ["unlimited"] + budgets:
            try:
                run(fp8, f"ours_fp8_stream{suffix}", budget)
            except Exception as e:  # noqa: BLE001  (an experimental quantizer must not end the run)
                emit({"kind": "skip", "mode": f"ours_fp8_stream{suffix}", "budget": budget, "error": repr(e)[:500]})
                break
    set_fp8_matmul_options(Fp8MatmulOptions())
    del fp8
    mm.unload_all_models()
    import comfy.sd

    bf16 = comfy.sd.load_diffusion_model(model_path)  # what UNETLoader does with weight dtype "default"
    for budget in [] if smoke else ["12"]:
        run(bf16, "ours_bf16_stream", budget)
    out.close()
    del torch


def table(rows: list[dict]) -> str:
    ref = next((r["s_per_it"] for r in rows if r.get("mode") == "comfy_bf16" and r.get("budget") == "unlimited"), None)
    lines = [f"{'mode':<18} {'budget':>9} {'s/it':>7} {'ratio':>6} {'floor':>6} {'peak GiB':>9}"]
    for r in rows:
        if r.get("kind") != "row" or r.get("s_per_it") is None:
            continue
        ratio = r["s_per_it"] / ref if ref else float("nan")
        floor = r.get("transfer_floor_s")
        lines.append(f"{r['mode']:<18} {r['budget']:>9} {r['s_per_it']:7.3f} {ratio:6.2f} "
                     f"{'' if floor is None else f'{floor:6.3f}':>6} {r.get('peak_gib') or 0:9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.offload_flux", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budgets", default="12,8,6,4")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--core", default="bf16,fp8,fp8_fast", help="ComfyUI core modes to measure (bf16 "
                    "resident, the reference, always)")
    ap.add_argument("--act-quant", default="eager", help="activation quantizers for our fp8 rows: eager, "
                    "compiled, triton (comma list)")
    ap.add_argument("--ours", nargs=2, metavar=("MODEL", "ROWS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    budgets = [] if a.smoke else a.budgets.split(",")
    if a.ours:
        ours(a.ours[0], a.ours[1], budgets, a.steps, a.smoke, a.act_quant.split(","))
        return 0
    size = "tiny" if a.smoke else "full"
    from harness.synthetic.cache import default_models_dir

    models_dir = Path(a.models_dir) if a.models_dir else default_models_dir(size)
    model, _build_s = ensure_model(size, models_dir, "cpu" if a.smoke else "cuda")
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M")
    rows_file = out_dir / f"offload_flux_rows_{stamp}.jsonl"
    core_rows(model, rows_file, budgets, a.steps, a.smoke, a.core.split(","))
    subprocess.run([sys.executable, "-m", "bench.offload_flux", "--ours", str(model), str(rows_file),
                    "--steps", str(a.steps), "--budgets", a.budgets, "--act-quant", a.act_quant]
                   + (["--smoke"] if a.smoke else []), check=False)
    rows = [json.loads(x) for x in rows_file.read_text().splitlines() if x.strip()]
    import torch

    env = device_environment(torch.device("cpu" if a.smoke else "cuda"))
    name = env.get("device_name", "cpu").lower().replace(" ", "-")
    result = {"benchmark": "offload_flux", "smoke": a.smoke, "environment": env,
              "command": "python -m bench.offload_flux " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    write_json(out_dir / f"offload_flux_{name}_{stamp}.json", result)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
