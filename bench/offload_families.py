"""Issue #4 for NewBie (the DiT alone) and SDXL (its UNet): ChunkedOffloadUNet at simulated 8/6/4 GiB cards
beside ComfyUI core at the same budgets, in one command, ratios to the family's resident ComfyUI core.

    COMFYUI_PATH=... python -m bench.offload_families --models-dir /tmp/models [--families newbie,sdxl]
    python -m bench.offload_families --smoke     # CPU: tiny models, 64x64, 2 steps, no ballast

Per family (FAMILIES): the full-size synthetic model is written if missing (harness.synthetic, on the GPU),
then two processes append rows to one JSON-lines file:
- ComfyUI core (bench.comfy_core_flux --family F): UNETLoader with each weight dtype, resident (the 1.00
  reference is the first: bf16 NewBie, fp16 SDXL, as ComfyUI loads them) and at each budget;
- ours (`--ours` here): Float8DiTLoader's loader (per-channel e4m3fn, fp8 matmul; SDXL: the transformer
  blocks' linear layers) and, for SDXL, the checkpoint's fp16 UNet as ComfyUI loads it, each resident and
  with ChunkedOffloadUNet (budget auto: the ballast leaves exactly the budget free) at each budget.
Workload (bench.workload): 1024x1024, euler/simple, 5 steps, s/it over steps 2..N, batch 1 with CFG
(NewBie 4.5, SDXL 6: cond and uncond in one batch of 2), random conditioning of the encoders' shapes.
Every row gets its floor = max(resident compute of its mode, streamed bytes per step / 55.6 GB/s) and NVML
peak (bench.offload_rows). A row that fails records its error; the rows after it still run.
Writes bench/results/offload_<family>_<device>_<stamp>.json per family and prints one table last.
`--smoke` (tiny models, 32x32, 2 steps, NewBie with 8 caption tokens, on the CPU) adds, for the family's
first mode of ours, a row streamed on the CPU within a byte budget that leaves about half the blocks on
the host: the streaming path runs, without CUDA streams or a ballast.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .anchor import default_comfyui_path, ensure_model
from .ballast import parse_budgets
from .comfy_core_flux import error_row
from .offload_rows import OursRun, finish, table
from .results import REPO_ROOT, RESULTS_DIR
from .workload import workload_for


@dataclass(frozen=True)
class FamilyBench:
    synthetic: str                     # harness.synthetic registry name
    core: tuple[tuple[str, str], ...]  # (mode, UNETLoader weight dtype), in one ComfyUI process; first = 1.00
    ours: tuple[tuple[str, str], ...]  # (mode, loader: "fp8" Float8DiTLoader's, "comfy" UNETLoader's default)
    what: str

    @property
    def reference(self) -> str:
        return self.core[0][0]


FAMILIES = {
    "newbie": FamilyBench("newbie", (("comfy_bf16", "default"), ("comfy_fp8", "fp8_e4m3fn")),
                          (("ours_fp8", "fp8"),),
                          "NewBie-image Exp0.1 DiT (3.5B Next-DiT + Jina pooled path), 6.5 GiB bf16"),
    "sdxl": FamilyBench("sdxl", (("comfy_fp16", "default"),),
                        (("ours_fp16", "comfy"), ("ours_fp8", "fp8")),
                        "SDXL base 1.0 UNet (2.6B) from the all-in-one checkpoint, 4.8 GiB fp16"),
}
# A CPU smoke run's workload, as small as the models take: NewBie's tiny DiT is still 2304 wide (400M
# parameters) and SDXL's tiny UNet 700M; at 64x64 and NewBie's 256 caption tokens they would take minutes.
SMOKE_WORKLOAD = {"newbie": {"width": 32, "height": 32, "txt_tokens": 8}, "sdxl": {"width": 32, "height": 32}}


def workload(family: str, steps: int, smoke: bool):
    return workload_for(family, steps=steps, **(SMOKE_WORKLOAD[family] if smoke else {}))


def cpu_partial_budget(run: OursRun, model) -> int:
    """Smoke: device bytes that keep about half of the block bytes resident (planner: activations + margin
    + resident blocks + two slots of the largest streamed group)."""
    from lowvram_kit.nodes.model_families import family_of_model
    from lowvram_kit.offload import OffloadConfig
    from lowvram_kit.offload.packing import block_nbytes

    dm = model.model.diffusion_model
    fam = family_of_model(dm)
    sizes = block_nbytes([u for name in fam.block_lists for u in fam.stream_units(getattr(dm, name))])
    batch = 1 if run.w.cfg == 1.0 else 2
    activation = int(model.model.memory_required([batch, *run.w.latent_shape[1:]]))
    margin = OffloadConfig(budget_bytes=1 << 40).margin_bytes
    return activation + margin + sum(sizes) // 2 + 2 * max(sizes)


def ours(family: str, model_path: str, rows_path: str, budgets: list[str], steps: int, smoke: bool) -> None:
    """Our rows, in this process: each mode loaded once, then resident and streamed at each budget."""
    run = OursRun(rows_path, workload(family, steps, smoke), smoke)
    for i, (mode, loader) in enumerate(FAMILIES[family].ours):
        model = run.load_fp8(model_path, mode) if loader == "fp8" else run.load_comfy(model_path, mode)
        if model is None:
            for budget in ["unlimited"] + budgets:
                gib = None if budget == "unlimited" else float(budget)
                run.emit({**error_row(gib, RuntimeError("the load failed (see its load record)")),
                          "kind": "row", "mode": mode})
            continue
        for budget in ["unlimited"] + budgets:
            run.row(model, mode, budget, loader=loader)
        if smoke and i == 0:  # the path is the same for every mode: once is enough for a CPU run
            run.row(model, mode, "unlimited", budget_bytes=cpu_partial_budget(run, model), loader=loader)
        run.mm.unload_all_models()
        del model
    run.close()


def core_process(family: str, model: Path, budgets: list[str], rows: Path, steps: int, smoke: bool) -> int:
    fb = FAMILIES[family]
    w = workload(family, steps, smoke)
    cmd = [sys.executable, "-m", "bench.comfy_core_flux", "--family", family, "--model", str(model),
           "--weight-dtype", ",".join(d for _, d in fb.core), "--mode", ",".join(m for m, _ in fb.core),
           "--budgets", ",".join(["unlimited"] + budgets), "--rows-out", str(rows), "--steps", str(steps),
           "--width", str(w.width), "--height", str(w.height), "--txt-tokens", str(w.txt_tokens),
           "--"] + (["--cpu"] if smoke else [])
    print("[bench] " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO_ROOT).returncode


def ours_process(family: str, model: Path, budgets: list[str], rows: Path, steps: int, smoke: bool) -> int:
    cmd = [sys.executable, "-m", "bench.offload_families", "--ours", family, str(model), str(rows),
           "--steps", str(steps), "--budgets", ",".join(budgets)] + (["--smoke"] if smoke else [])
    print("[bench] " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO_ROOT).returncode


def run_family(family: str, a, budgets: list[str], stamp: str) -> tuple[Path | None, list[dict], dict]:
    size = "tiny" if a.smoke else "full"
    fb = FAMILIES[family]
    from harness.synthetic.cache import default_models_dir

    models_dir = Path(a.models_dir) if a.models_dir else default_models_dir(size)
    try:
        model, build_s = ensure_model(size, models_dir, "cpu" if a.smoke else "cuda", fb.synthetic)
    except subprocess.CalledProcessError as e:
        print(f"[bench] {family}: writing the synthetic model failed ({e}); skipping this family", flush=True)
        return None, [], {"build": e.returncode}
    out_dir = Path(a.out_dir)
    rows_file = out_dir / f"offload_{family}_rows_{stamp}.jsonl"
    codes = {"core": core_process(family, model, budgets, rows_file, a.steps, a.smoke),
             "ours": ours_process(family, model, budgets, rows_file, a.steps, a.smoke)}
    routes = {"fp8": "Float8DiTLoader (compute fp8)", "comfy": "UNETLoader default"}
    modes = {**{m: {"route": "ComfyUI core, UNETLoader", "weight_dtype": d} for m, d in fb.core},
             **{m: {"route": f"ours: {routes[loader]} + ChunkedOffloadUNet (budget auto)"} for m, loader in fb.ours}}
    path, rows = finish(f"offload_{family}", rows_file, out_dir, stamp, a.smoke, fb.reference,
                        {"family": family, "what": fb.what, "model": str(model), "build_or_check_s": build_s,
                         "budgets": budgets, "modes": modes, "exit_codes": codes})
    for r in rows:
        r["family"] = family
    return path, rows, codes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.offload_families", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, small images, 2 steps, CPU, no ballast")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    ap.add_argument("--budgets", default="8,6,4", help="GiB list (each mode also runs resident)")
    ap.add_argument("--steps", type=int, default=None, help="default 5 (smoke: 2)")
    ap.add_argument("--models-dir", default=None, help="where the synthetic models live or are written "
                    "(default: harness.synthetic's .cache/models/synthetic-<size>)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--ours", nargs=3, metavar=("FAMILY", "MODEL", "ROWS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.steps = a.steps or (2 if a.smoke else 5)
    budgets = [] if a.smoke else [b.strip() for b in a.budgets.split(",") if b.strip()]
    if a.ours:
        ours(a.ours[0], a.ours[1], a.ours[2], budgets, a.steps, a.smoke)
        return 0
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    if not families or [f for f in families if f not in FAMILIES]:
        ap.error(f"--families {a.families!r}: choose from {', '.join(FAMILIES)}")
    try:
        if None in parse_budgets(",".join(budgets or ["1"])):
            raise ValueError("'unlimited' is always measured; list only GiB values")
    except ValueError as e:
        ap.error(f"--budgets {a.budgets!r}: {e}")
    comfyui_path = default_comfyui_path()
    if comfyui_path is None:
        ap.error("no ComfyUI: set COMFYUI_PATH to a ComfyUI tree, or run scripts/bootstrap.sh")
    os.environ["COMFYUI_PATH"] = comfyui_path          # the child processes read it
    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M", time.gmtime())
    paths, rows, failed = [], [], {}
    for family in families:
        path, family_rows, codes = run_family(family, a, budgets, stamp)
        paths += [path] if path else []
        rows += family_rows
        failed.update({f"{family}/{k}": c for k, c in codes.items() if c})
    print(table(rows))
    for p in paths:
        print(f"results: {p}")
    if failed:
        print(f"processes that failed (exit code): {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
