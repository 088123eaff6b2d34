"""Issue #3's speed criteria: our fp8 Flux-dev against ComfyUI core, in one run on one machine.

    python -m bench.fp8_flux --models-dir /tmp/models --out-dir $OUT     # CUDA: full-size Flux-dev, 1024x1024
    python -m bench.fp8_flux --smoke                                      # anywhere: tiny model, 64x64, CPU

Same workload as bench.anchor (euler/simple, cfg 1, guidance 3.5, random conditioning, s/it over steps
2..N, NVML peak above the post-ballast level). Processes, in order:
1. ComfyUI core, one process per weight option (bench.comfy_core_flux; ComfyUI reads --fast at import):
   bf16 (the 1.00 reference), fp8_e4m3fn storage, fp8_e4m3fn_fast with --fast fp8_matrix_mult;
2. bench.fp8_flux_ours: our loader (fp8 matmul with per-token or per-tensor activation scales, dequant;
   a --budget GiB row), and every load time (ComfyUI's plain load of the bf16 file and of a plain fp8
   file, ours quantizing on load, ours reloading its saved copy);
3. bench.fp8_linear_micro (CUDA): where an fp8 Linear's time goes, per Flux linear shape.
Each row carries s/it, its ratio to ComfyUI bf16, the peak, and the rel. L2 distance of its output latent
to ComfyUI bf16's (same seed, same noise). bench/results/float8_flux_<device>_<date>.json is rewritten
after each process; the table and the issue's criteria are printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from .anchor import MODES, comfy_and_model, run_mode, size_workload
from .fp8_flux_ours import OURS
from .results import REPO_ROOT, RESULTS_DIR, host_environment, slug, utc_now, write_json
from .table import format_table

BENCHMARK = "float8_flux"
COMFY = {f"comfy_{m.name}": replace(m, name=f"comfy_{m.name}") for m in MODES.values()}
# Not run by default (it compiles for a minute or two): ComfyUI's own TorchCompileModel on bf16, the fair
# reference for ours with the same node ("torch_compile" extras).
COMFY["comfy_bf16_compile"] = replace(MODES["bf16"], name="comfy_bf16_compile", torch_compile=True,
                                      what="bf16 + ComfyUI's TorchCompileModel (inductor)")
DEFAULT_COMFY_MODES = ",".join(f"comfy_{m}" for m in MODES)
REFERENCE = "comfy_bf16"
# Issue #3, "Done when" (speed part): ratios to resident bf16 ComfyUI in the same run, GiB, load ratios.
CRITERIA = {"fp8_matmul_ratio_max": 0.76, "dequant_ratio_max": 1.10, "peak_gib_max": 12.5,
            "quantize_load_vs_comfy_bf16_load_max": 1.5, "reload_vs_comfy_fp8_load_max": 1.0}
ACT_MODES = {"per_token": "ours_fp8_token", "per_tensor": "ours_fp8_tensor"}


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def find_row(rows: list[dict], mode: str, budget=None, repeat=False) -> dict | None:
    return next((r for r in rows if r.get("mode") == mode and r.get("budget_gib") == budget
                 and bool(r.get("repeat")) == repeat), None)


def annotate(rows: list[dict]) -> dict:
    """Ratio to ComfyUI bf16 and rel. L2 of the output latent to ComfyUI bf16's, in place; returns the base."""
    ref = find_row(rows, REFERENCE)
    base = ref.get("s_per_it") if ref else None
    ref_latent = torch.load(ref["latent_file"]) if ref and ref.get("latent_file") else None
    for r in rows:
        s = r.get("s_per_it")
        r["ratio_to_comfy_bf16"] = s / base if (s and base) else None
        if ref_latent is not None and r.get("latent_file") and Path(r["latent_file"]).exists():
            r["rel_l2_vs_comfy_bf16"] = rel_l2(torch.load(r["latent_file"]), ref_latent)
        eager = eager_row_of(rows, r)
        if eager is not None and Path(r["latent_file"]).exists() and Path(eager["latent_file"]).exists():
            # An extra (e.g. "+blocks_compile") runs on the reloaded saved copy: 0 here means bit-identical.
            r["rel_l2_vs_eager"] = rel_l2(torch.load(r["latent_file"]), torch.load(eager["latent_file"]))
    return {"reference": REFERENCE, "reference_s_per_it": base}


# The row sampled on the same model just before an extra, by the extra's base mode: the dequant model's own
# row, and for the fp8 matmul extras the reloaded saved copy they run on.
EAGER_OF_EXTRAS = {"ours_dequant": "ours_dequant"}
EAGER_OF_FP8_EXTRAS = "ours_fp8_reloaded"


def eager_row_of(rows: list[dict], r: dict) -> dict | None:
    """The eager row an extra's output is compared with (None for rows that are not extras)."""
    if "+" not in str(r.get("mode", "")) or not r.get("latent_file"):
        return None
    base = str(r["mode"]).split("+", 1)[0]
    eager = find_row(rows, EAGER_OF_EXTRAS.get(base, EAGER_OF_FP8_EXTRAS), r.get("budget_gib"))
    return eager if eager and eager.get("latent_file") else None


def noise(rows: list[dict]) -> dict[str, float]:
    out = {}
    for r in rows:
        again = find_row(rows, r["mode"], r.get("budget_gib"), repeat=True) if not r.get("repeat") else None
        if again and again.get("s_per_it") and r.get("s_per_it"):
            out[r["mode"]] = abs(again["s_per_it"] / r["s_per_it"] - 1)
    return out


def choose_act_scaling(rows: list[dict], noise_frac: float, default: str = "per_token") -> dict:
    """The default activation scaling, by measured accuracy first, then speed.

    Rule: rel. L2 values within 2% of each other are a tie. The more accurate scaling wins; the other
    only if it is faster by more than the run's noise (at least 2%) while its rel. L2 is at most 10%
    higher. On a tie in accuracy the faster one wins; on a tie in both, `default` stays (per-token is
    the one that tolerates outlier tokens, which random synthetic activations do not have).
    """
    got = {k: find_row(rows, m) for k, m in ACT_MODES.items()}
    if any(r is None or r.get("rel_l2_vs_comfy_bf16") is None or not r.get("s_per_it") for r in got.values()):
        return {"choice": None, "why": "per-token or per-tensor row missing"}
    err = {k: r["rel_l2_vs_comfy_bf16"] for k, r in got.items()}
    sit = {k: r["s_per_it"] for k, r in got.items()}
    margin = max(noise_frac, 0.02)
    fast, slow = sorted(sit, key=sit.get)
    faster = fast if sit[fast] < sit[slow] * (1 - margin) else None
    acc, other = sorted(err, key=err.get)
    if err[other] - err[acc] <= 0.02 * err[acc]:
        choice, why = faster or default, "accuracy tie; " + (f"{faster} faster" if faster else "speed tie: default kept")
    elif faster == other and err[other] <= 1.10 * err[acc]:
        choice, why = other, f"{other} faster, error at most 10% higher"
    else:
        choice, why = acc, f"{acc} more accurate"
    return {"choice": choice, "why": why, "rel_l2": err, "s_per_it": sit, "noise_margin": margin,
            "rule": " ".join(choose_act_scaling.__doc__.split("\n\n")[1].split())}


def load_times(loads: list[dict]) -> dict[str, dict]:
    out = {}
    for what in dict.fromkeys(r["what"] for r in loads):
        secs = [r["seconds"] for r in loads if r["what"] == what]
        out[what] = {"seconds": secs, "median_s": statistics.median(secs),
                     "file_bytes": next((r.get("file_bytes") for r in loads if r["what"] == what), None)}
    return out


def criteria(rows: list[dict], loads: dict, choice: str | None, smoke: bool) -> list[dict]:
    def check(name, value, limit, what):
        ok = None if (value is None or smoke) else value <= limit
        return {"criterion": name, "value": value, "limit": limit, "met": ok, "what": what}

    fp8 = find_row(rows, ACT_MODES.get(choice or "per_token", "ours_fp8_token"))
    # The same fp8 matmul model with CompileModelBlocks (extra "blocks_compile"): quantizing the activations
    # fuses with the norm and modulation before each linear, which the eager layer cannot do.
    compiled = find_row(rows, "ours_fp8_token+blocks_compile")   # the extras run on the per-token model
    deq = find_row(rows, "ours_dequant")
    deq_compiled = find_row(rows, "ours_dequant+blocks_compile")
    lt = {k: v["median_s"] for k, v in loads.items()}
    ratio = (lambda a, b: lt[a] / lt[b] if a in lt and b in lt else None)
    return [
        check("fp8 matmul s/it ratio", fp8 and fp8.get("ratio_to_comfy_bf16"), CRITERIA["fp8_matmul_ratio_max"],
              f"{fp8 and fp8['mode']} resident, to ComfyUI bf16"),
        check("fp8 matmul + CompileModelBlocks s/it ratio", compiled and compiled.get("ratio_to_comfy_bf16"),
              CRITERIA["fp8_matmul_ratio_max"], f"{compiled and compiled['mode']} resident, to ComfyUI bf16"),
        check("peak VRAM GiB, + CompileModelBlocks", compiled and compiled.get("peak_gib"), CRITERIA["peak_gib_max"],
              "resident fp8 matmul row with CompileModelBlocks"),
        check("dequant s/it ratio", deq and deq.get("ratio_to_comfy_bf16"), CRITERIA["dequant_ratio_max"],
              "ours_dequant resident, to ComfyUI bf16"),
        check("dequant + CompileModelBlocks s/it ratio", deq_compiled and deq_compiled.get("ratio_to_comfy_bf16"),
              CRITERIA["dequant_ratio_max"], "ours_dequant+blocks_compile resident, to ComfyUI bf16"),
        check("peak VRAM GiB", fp8 and fp8.get("peak_gib"), CRITERIA["peak_gib_max"], "resident fp8 matmul row"),
        check("quantizing load / ComfyUI bf16 load", ratio("ours_quantize_load", "comfy_load_bf16_file"),
              CRITERIA["quantize_load_vs_comfy_bf16_load_max"], "medians, page cache warm"),
        check("reload saved copy / ComfyUI fp8 file load", ratio("ours_reload_saved_copy", "comfy_load_fp8_file"),
              CRITERIA["reload_vs_comfy_fp8_load_max"], "medians, page cache warm"),
    ]


def print_tables(payload: dict) -> None:
    env = payload["environment"]
    rows = payload["rows"]
    print(f"\n{BENCHMARK}: {env.get('device_name')} (driver {env.get('driver')}, torch {env.get('torch')}, "
          f"ComfyUI {env.get('comfyui_version')}); reference {REFERENCE} "
          f"{payload['summary'].get('reference_s_per_it')} s/it")
    print(format_table(
        ["mode", "budget", "s/it", "ratio", "rel L2 vs bf16", "vs eager", "peak GiB", "torch GiB", "first step s", "finite"],
        [[r["mode"] + (" (again)" if r.get("repeat") else ""), r.get("budget"), r.get("s_per_it"),
          r.get("ratio_to_comfy_bf16"), r.get("rel_l2_vs_comfy_bf16"), r.get("rel_l2_vs_eager"), r.get("peak_gib"), r.get("peak_torch_alloc_gib"),
          r.get("first_step_s"), r.get("latent_finite") if "error" not in r else "ERROR"] for r in rows], digits=4))
    print(format_table(["load", "median s", "each s", "file GB"],
                       [[k, v["median_s"], " ".join(f"{s:.2f}" for s in v["seconds"]),
                         None if v["file_bytes"] is None else v["file_bytes"] / 1e9]
                        for k, v in payload["loads"].items()], digits=3))
    micro = payload.get("micro") or {}
    if micro.get("per_step_s"):
        print(format_table(["micro variant", "s per step in Flux linears"],
                           [[k, v] for k, v in micro["per_step_s"].items()], digits=4))
    act = payload["summary"]["act_scaling"]
    print(f"act_scaling choice: {act.get('choice')} ({act.get('why')}; rel L2 {act.get('rel_l2')}, "
          f"s/it {act.get('s_per_it')}); rule: {act.get('rule', '-')}")
    print(format_table(["criterion", "value", "limit", "met", "what"],
                       [[c["criterion"], c["value"], c["limit"], c["met"], c["what"]] for c in payload["criteria"]]))
    for line in payload["summary"]["errors"]:
        print("error: " + line)


def run_child(cmd: list[str], env: dict, deadline: float | None) -> int:
    """Run one process; past the deadline it is killed (exit code -9) so the results so far still get written."""
    print("[bench] " + " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, cwd=REPO_ROOT, env=env,
                              timeout=None if deadline is None else max(1.0, deadline - time.time())).returncode
    except subprocess.TimeoutExpired:
        print(f"[bench] killed at the deadline: {' '.join(cmd[:3])}", flush=True)
        return -9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fp8_flux", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, 64x64, 2 steps, on the CPU, no ballast")
    ap.add_argument("--models-dir", default=None, help="where the synthetic model lives or is written")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the result JSON goes")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--budget", type=float, default=12.0, help="GiB budget of the extra ours fp8 row (CUDA)")
    ap.add_argument("--comfy-modes", default=DEFAULT_COMFY_MODES, help=f"comma list of {', '.join(COMFY)}")
    ap.add_argument("--ours-modes", default=",".join(OURS), help=f"comma list of {', '.join(OURS)}")
    ap.add_argument("--extras", default="fast_accum,triton,triton_fast_accum,compiled",
                    help="matmul options tried last (bench.fp8_flux_ours.EXTRAS)")
    ap.add_argument("--load-repeats", type=int, default=2, help="times each load is timed")
    ap.add_argument("--no-micro", dest="micro", action="store_false", help="skip bench.fp8_linear_micro")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="wall-clock budget: optional steps (compiling, the micro benchmark) are skipped near it")
    a = ap.parse_args(argv)
    comfy_modes = [m for m in a.comfy_modes.split(",") if m]
    if REFERENCE not in comfy_modes or any(m not in COMFY for m in comfy_modes):
        ap.error(f"--comfy-modes must include {REFERENCE} and name only {', '.join(COMFY)}")
    t_start = time.time()
    deadline = None if a.time_budget_s is None else t_start + a.time_budget_s
    size_workload(a)
    a.noise_check = not a.smoke
    size = "tiny" if a.smoke else "full"
    comfyui_path, model, build_s = comfy_and_model(a, ap)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{BENCHMARK}_"))   # rows, latents, plain fp8 copy; removed at the end
    rows_file, latent_dir, micro_file = scratch / "rows.jsonl", scratch / "latents", scratch / "micro.json"
    stamp = time.strftime("%Y-%m-%dT%H%M", time.gmtime())
    started = utc_now()
    host = host_environment(comfyui_path)
    env_child = {**os.environ, "COMFYUI_PATH": comfyui_path, "PYTHONUNBUFFERED": "1"}
    comfy_flags = ["--cpu"] if a.smoke else []
    exit_codes: dict[str, int] = {}

    def write() -> tuple[Path, dict]:
        records = read_jsonl(rows_file)
        envs = [r for r in records if r.get("kind") == "env"]
        rows = [r for r in records if r.get("kind") == "row"]
        summary = annotate(rows)
        summary["repeat_noise"] = noise(rows)
        summary["act_scaling"] = choose_act_scaling(rows, max(summary["repeat_noise"].values(), default=0.0))
        loads = load_times([r for r in records if r.get("kind") == "load"])
        summary["errors"] = [f"{r['mode']}@{r.get('budget')}: {r['error']}" for r in rows if "error" in r] + [
            f"stage {r['stage']}: {r['error']}" for r in records if r.get("kind") == "stage_error"] + [
            f"process {k} exited {v}" for k, v in exit_codes.items() if v != 0]
        env = {**host, **{k: v for k, v in (envs[0] if envs else {}).items() if k in (
            "device_name", "device_total_bytes", "driver", "cuda", "torch", "compute_capability", "pcie_gen_max",
            "pcie_width_max", "pcie_gen_current", "pcie_width_current", "nvml_note", "torch_threads")}}
        micro = json.loads(micro_file.read_text()) if micro_file.exists() else None
        payload = {
            "benchmark": BENCHMARK, "smoke": a.smoke, "started": started, "finished": utc_now(), "environment": env,
            "model": {"path": str(model), "size": size, "build_or_check_s": build_s},
            "workload": next((e.get("workload") for e in envs), None),
            "processes": {e["mode"]: {k: e.get(k) for k in ("comfy_argv", "comfy_fast", "weight_dtype", "linear_class",
                                                            "vram_state", "load_s")} for e in envs},
            "exit_codes": exit_codes, "criteria_source": "issue #3, Done when (speed part)",
            "criteria": criteria(rows, loads, summary["act_scaling"].get("choice"), a.smoke),
            "summary": summary, "rows": rows, "loads": loads,
            "checks": [r for r in records if r.get("kind") == "check"],
            "other_records": [r for r in records if r.get("kind") in ("cache", "prep", "report", "skip", "stage_error")],
            "micro": micro}
        out = out_dir / f"{BENCHMARK}_{'smoke_' if a.smoke else ''}{slug(env.get('device_name') or 'unknown')}_{stamp}.json"
        write_json(out, payload)
        print(f"[bench] wrote {out}", flush=True)
        return out, payload

    for name in comfy_modes:
        exit_codes[name] = run_mode(COMFY[name], model, "unlimited", rows_file, a, comfyui_path,
                                    extra=("--latent-out", str(latent_dir)))
        write()
    cmd = [sys.executable, "-m", "bench.fp8_flux_ours", "--model", str(model), "--rows-out", str(rows_file),
           "--latent-dir", str(latent_dir), "--work-dir", str(scratch if a.smoke else model.parent),
           "--width", str(a.width), "--height", str(a.height), "--steps", str(a.steps),
           "--txt-tokens", str(a.txt_tokens), "--extras", "" if a.smoke else a.extras, "--modes", a.ours_modes,
           "--load-repeats", str(a.load_repeats)]
    cmd += ([] if a.smoke else ["--budget-row", str(a.budget), "--noise-check"])
    cmd += ([] if deadline is None else ["--deadline", str(deadline)]) + ["--", *comfy_flags]
    exit_codes["ours"] = run_child(cmd, env_child, deadline)
    write()
    if a.micro and (deadline is None or deadline - time.time() > 60):
        cmd = [sys.executable, "-m", "bench.fp8_linear_micro", "--out", str(micro_file)]
        cmd += ["--smoke", "--no-compile"] if a.smoke else []
        cmd += ["--no-compile"] if deadline is not None and deadline - time.time() < 150 else []
        exit_codes["micro"] = run_child(cmd, env_child, deadline)
    out, payload = write()
    shutil.rmtree(scratch, ignore_errors=True)
    print_tables(payload)
    print(f"results: {out}")
    failed = {k: v for k, v in exit_codes.items() if v != 0}
    return 1 if failed or any(r.get("latent_finite") is False for r in payload["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
