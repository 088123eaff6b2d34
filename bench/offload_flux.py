"""Issue #4's benchmark: ChunkedOffloadUNet on Flux-dev at simulated 12/8/6/4 GiB cards, beside ComfyUI core
at the same budgets, all in one run, ratios to resident bf16 ComfyUI.

    COMFYUI_PATH=... python -m bench.offload_flux --models-dir /tmp/models --out-dir DIR [--budgets 12,8,6,4]
    python -m bench.offload_flux --smoke        # CPU: tiny model, 64x64, checks the harness only

Processes (each imports ComfyUI with its own flags): ComfyUI core via bench.comfy_core_flux (bf16 resident
= the 1.00 reference and bf16 at 12 GiB; fp8 storage and fp8 with --fast fp8_matrix_mult at each budget),
and ours via `--ours` here: Float8DiTLoader (per-channel fp8, fp8 matmul) + ChunkedOffloadUNet with budget
auto (the ballast leaves exactly the budget free), and bf16 weights + ChunkedOffloadUNet at 12 GiB.
Every row gets its floor, max(resident compute time, streamed bytes per step / 55.6 GB/s)
(bench.offload_rows); ours also record the plan. NewBie and SDXL: bench.offload_families.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from .anchor import ensure_model
from .comfy_core_flux import graph_breaks
from .offload_rows import OursRun, finish, table
from .results import RESULTS_DIR
from .workload import Workload


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


def dynamo_counts() -> dict:
    """torch._dynamo's counters so far in this process: graphs compiled and recompiles (0 = the blocks of a kind
    share one graph across instances and budgets, as they should)."""
    import torch._dynamo.utils as dynamo_utils

    counters = dynamo_utils.counters
    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "recompiles": int(sum(counters["recompiles"].values())),
            "graph_breaks": int(sum(graph_breaks().values()))}


def ours(model_path: str, rows_path: str, budgets: list[str], steps: int, smoke: bool, act_quants: list[str],
         blocks_compile: bool = False) -> None:
    """Our rows, in this process: load once per weight kind, stream at each budget (and each activation
    quantizer of quant.matmul.Fp8MatmulOptions)."""
    run = OursRun(rows_path, Workload(steps=steps, **({"width": 64, "height": 64} if smoke else {})), smoke)
    from lowvram_kit.quant.matmul import Fp8MatmulOptions, set_fp8_matmul_options

    fp8 = run.load_fp8(model_path)
    for act_quant in act_quants if fp8 is not None else []:
        set_fp8_matmul_options(Fp8MatmulOptions(act_quant=act_quant))
        suffix = "" if act_quant == "eager" else f"_{act_quant}"
        for budget in ["unlimited"] + budgets:
            if "error" in run.row(fp8, f"ours_fp8_stream{suffix}", budget):
                break  # an experimental quantizer must not end the run, nor spend it failing
    set_fp8_matmul_options(Fp8MatmulOptions())
    if blocks_compile and fp8 is not None:
        # CompileModelBlocks (inductor) on the same fp8 model: resident through ComfyUI's compile wrapper, streamed
        # through the streamer's per-forward compile; the first row compiles (its first step).
        from lowvram_kit.nodes.comfy_block_compile import compile_blocks

        # The last streamed clone is still loaded, its stand-in block lists patched into the shared model, where
        # ComfyUI's compile helper would look the blocks up: unloading restores the model's own lists.
        run.mm.unload_all_models()
        compiled = compile_blocks(fp8, backend="eager" if smoke else "inductor")
        for budget in ["unlimited"] + budgets:
            if "error" in run.row(compiled, "ours_fp8_stream_blocks_compile", budget):
                break
        run.emit({"kind": "dynamo", **dynamo_counts()})
        del compiled
    del fp8
    run.mm.unload_all_models()
    bf16 = run.load_comfy(model_path, "ours_bf16")
    for budget in [] if smoke or bf16 is None else ["12"]:
        run.row(bf16, "ours_bf16_stream", budget, resident_mode="comfy_bf16")  # same weights, resident
    run.close()


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
    ap.add_argument("--blocks-compile", action="store_true", help="also our fp8 rows with CompileModelBlocks "
                    "(resident and streamed at each budget)")
    ap.add_argument("--ours", nargs=2, metavar=("MODEL", "ROWS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    budgets = [] if a.smoke else a.budgets.split(",")
    if a.ours:
        ours(a.ours[0], a.ours[1], budgets, a.steps, a.smoke, a.act_quant.split(","), a.blocks_compile)
        return 0
    size = "tiny" if a.smoke else "full"
    from harness.synthetic.cache import default_models_dir

    models_dir = Path(a.models_dir) if a.models_dir else default_models_dir(size)
    model, _build_s = ensure_model(size, models_dir, "cpu" if a.smoke else "cuda")
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M", time.gmtime())
    rows_file = out_dir / f"offload_flux_rows_{stamp}.jsonl"
    core_rows(model, rows_file, budgets, a.steps, a.smoke, a.core.split(","))
    subprocess.run([sys.executable, "-m", "bench.offload_flux", "--ours", str(model), str(rows_file),
                    "--steps", str(a.steps), "--budgets", a.budgets, "--act-quant", a.act_quant]
                   + (["--smoke"] if a.smoke else []) + (["--blocks-compile"] if a.blocks_compile else []), check=False)
    path, rows = finish("offload_flux", rows_file, out_dir, stamp, a.smoke, "comfy_bf16",
                        {"model": str(model)})
    print(table(rows, "flux"))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
