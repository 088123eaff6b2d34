"""The ComfyUI-core anchor: synthetic Flux-dev 1024x1024 at budgets unlimited..4 GiB, three weight modes.

    python -m bench.anchor                       # on a CUDA machine: full-size model, full matrix
    python -m bench.anchor --smoke               # anywhere: tiny model, 64x64, 2 steps, CPU, no ballast
    python -m bench.anchor --modes fp8 --budgets unlimited,8 --models-dir /tmp/models --out-dir /tmp/res

Builds the synthetic model if missing (`python -m harness.synthetic write flux-dev`), runs each mode in
its own process (`bench.comfy_core_flux`: ComfyUI reads `--fast` at import), prints the table with the
anchor of ../shared/guide/benchmarking.md beside each row, and writes
bench/results/comfy_core_flux_anchor_<device>_<date>.json (rewritten after every mode, so a run cut
short keeps what it measured). ComfyUI comes from $COMFYUI_PATH (default: .cache/ComfyUI-0.3.75).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .ballast import budget_label, parse_budgets
from .results import REPO_ROOT, RESULTS_DIR, host_environment, slug, utc_now, write_json
from .table import format_table

BENCHMARK = "comfy_core_flux_anchor"
ALL_BUDGETS = "unlimited,24,16,12,8,6,4"
TOLERANCE = 0.10      # a row "reproduces" when its s/it is within 10% of the anchor's


@dataclass(frozen=True)
class Mode:
    name: str
    weight_dtype: str            # UNETLoader's weight_dtype widget value
    comfy_argv: tuple[str, ...]  # ComfyUI server flags in effect for this mode
    what: str
    torch_compile: bool = False  # wrap the model as ComfyUI's TorchCompileModel node does (inductor)


MODES = {m.name: m for m in (
    Mode("bf16", "default", (), "bf16 file loaded as is"),
    Mode("fp8", "fp8_e4m3fn", (), "fp8_e4m3fn storage, bf16 compute"),
    Mode("fp8_fast", "fp8_e4m3fn_fast", ("--fast", "fp8_matrix_mult"),
         "fp8_e4m3fn_fast weights + --fast fp8_matrix_mult (fp8 matmul)"),
)}

# ../shared/guide/benchmarking.md, "The anchor": ComfyUI 0.3.75 alone on an H200 (PCIe Gen5 x16,
# torch 2.11), s/it over steady steps. Key: (mode, budget GiB or None for unlimited).
ANCHOR_S_PER_IT = {
    ("bf16", None): 0.160, ("bf16", 16.0): 0.231, ("bf16", 12.0): 0.282,
    ("fp8", None): 0.190, ("fp8", 12.0): 0.196, ("fp8", 8.0): 0.222, ("fp8", 6.0): 0.233, ("fp8", 4.0): 0.283,
    ("fp8_fast", None): 0.134, ("fp8_fast", 8.0): 0.183, ("fp8_fast", 4.0): 0.245,
}
ANCHOR_DEVICE = "NVIDIA H200 (PCIe Gen5 x16), torch 2.11, ComfyUI 0.3.75"


def default_comfyui_path() -> str | None:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return env
    cached = REPO_ROOT / ".cache" / "ComfyUI-0.3.75"
    return str(cached) if (cached / "main.py").is_file() else None


def ensure_model(size: str, models_dir: Path, device: str, name: str = "flux-dev") -> tuple[Path, float]:
    """The synthetic file `name` (harness.synthetic's registry; written if missing or stale) and seconds spent."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "harness.synthetic", "write", name, "--size", size,
           "--device", device, "--models-dir", str(models_dir)]
    print("[bench] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    from harness.synthetic import model_path   # torch import; no CUDA is touched in this process
    return model_path(name, size, models_dir), time.perf_counter() - t0


def size_workload(a) -> None:
    """The anchor workload on the parsed args, in place: 1024x1024, 256 text tokens, 5 steps on a GPU;
    64x64, 16 tokens, 2 steps for --smoke on the CPU (an explicit --steps wins)."""
    a.width = a.height = 64 if a.smoke else 1024
    a.txt_tokens = 16 if a.smoke else 256
    a.steps = a.steps or (2 if a.smoke else 5)


def comfy_and_model(a, ap) -> tuple[str, Path, float]:
    """(ComfyUI tree, synthetic Flux-dev file written or checked, seconds that took) for the parsed args."""
    size = "tiny" if a.smoke else "full"
    comfyui_path = default_comfyui_path()
    if comfyui_path is None:
        ap.error("no ComfyUI: set COMFYUI_PATH to a ComfyUI tree, or run scripts/bootstrap.sh")
    models_dir = Path(a.models_dir) if a.models_dir else REPO_ROOT / ".cache" / "models" / f"synthetic-{size}"
    model, build_s = ensure_model(size, models_dir, "cpu" if a.smoke else "cuda")
    return comfyui_path, model, build_s


def run_mode(mode: Mode, model: Path, budgets: str, rows_file: Path, a, comfyui_path: str,
             extra: tuple[str, ...] = ()) -> int:
    """One bench.comfy_core_flux process; `a` carries width, height, steps, txt_tokens, noise_check, smoke;
    `extra`: more of its options (e.g. --latent-out DIR)."""
    cmd = [sys.executable, "-m", "bench.comfy_core_flux", "--model", str(model), "--mode", mode.name,
           "--weight-dtype", mode.weight_dtype, "--budgets", budgets, "--rows-out", str(rows_file),
           "--width", str(a.width), "--height", str(a.height), "--steps", str(a.steps),
           "--txt-tokens", str(a.txt_tokens)]
    cmd += ["--noise-check"] if a.noise_check else []
    cmd += ["--torch-compile"] if mode.torch_compile else []
    cmd += [*extra, "--", *mode.comfy_argv, *(["--cpu"] if a.smoke else [])]
    print(f"[bench] mode {mode.name}: {mode.what}\n[bench] " + " ".join(cmd), flush=True)
    env = {**os.environ, "COMFYUI_PATH": comfyui_path, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env).returncode


def read_records(rows_file: Path) -> tuple[dict[str, dict], list[dict]]:
    envs, rows = {}, []
    if rows_file.exists():
        for line in rows_file.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("kind") == "env":
                    envs[rec["mode"]] = rec
                else:
                    rows.append(rec)
    return envs, rows


def annotate(rows: list[dict], compare: bool = True) -> dict:
    """Adds ratio / anchor fields to each row in place; returns the summary. `compare=False` (smoke runs:
    another workload on another device) leaves the anchor fields empty."""
    base = next((r["s_per_it"] for r in rows if r["mode"] == "bf16" and r["budget_gib"] is None
                 and not r.get("repeat") and r.get("s_per_it")), None)
    checked, within, noise = 0, 0, {}
    for r in rows:
        s = r.get("s_per_it")
        r["ratio_to_resident_bf16"] = s / base if (s and base) else None
        anchor = ANCHOR_S_PER_IT.get((r["mode"], r["budget_gib"])) if compare else None
        r["anchor_s_per_it"] = anchor
        r["anchor_ratio"] = anchor / ANCHOR_S_PER_IT[("bf16", None)] if anchor else None
        r["delta_vs_anchor"] = (s / anchor - 1) if (s and anchor) else None
        if r["delta_vs_anchor"] is not None and not r.get("repeat"):
            checked += 1
            within += abs(r["delta_vs_anchor"]) <= TOLERANCE
    for mode in {r["mode"] for r in rows}:
        pair = [r.get("s_per_it") for r in rows if r["mode"] == mode and r["budget_gib"] is None]
        if len(pair) == 2 and all(pair):
            noise[mode] = abs(pair[1] / pair[0] - 1)
    over = [f"{r['mode']}@{r['budget']}" for r in rows if r.get("within_budget") is False]
    return {"resident_bf16_s_per_it": base, "anchor_rows_checked": checked, "anchor_rows_within_tolerance":
            within, "tolerance": TOLERANCE, "repeat_noise": noise, "over_budget": over,
            "non_finite": [f"{r['mode']}@{r['budget']}" for r in rows if r.get("latent_finite") is False],
            "errors": [f"{r['mode']}@{r['budget']}: {r['error']}" for r in rows if "error" in r]}


def print_table(rows: list[dict], summary: dict, env: dict) -> None:
    headers = ["mode", "budget GiB", "s/it", "ratio", "anchor s/it", "anchor ratio", "vs anchor",
               "peak GiB", "torch GiB", "loaded GiB", "<=budget", "first step s", "load s", "finite"]
    table = [[r["mode"] + (" (again)" if r.get("repeat") else ""), r["budget"], r.get("s_per_it"),
              r.get("ratio_to_resident_bf16"), r.get("anchor_s_per_it"), r.get("anchor_ratio"),
              None if r.get("delta_vs_anchor") is None else f"{100 * r['delta_vs_anchor']:+.0f}%",
              r.get("peak_gib"), r.get("peak_torch_alloc_gib"), r.get("loaded_gib"), r.get("within_budget"),
              r.get("first_step_s"), r.get("load_s"), r.get("latent_finite")] for r in rows]
    print(f"\n{BENCHMARK}: {env.get('device_name')} (driver {env.get('driver')}, torch {env.get('torch')}, "
          f"ComfyUI {env.get('comfyui_version')}); anchor: {ANCHOR_DEVICE}")
    print(format_table(headers, table))
    print(f"within {TOLERANCE:.0%} of the anchor s/it: {summary['anchor_rows_within_tolerance']}/"
          f"{summary['anchor_rows_checked']} rows; repeat noise: "
          + (", ".join(f"{m} {v:.1%}" for m, v in sorted(summary["repeat_noise"].items())) or "-")
          + f"; over budget: {summary['over_budget'] or 'none'}; non-finite: {summary['non_finite'] or 'none'}")
    for e in summary["errors"]:
        print("error: " + e)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.anchor", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, 64x64, 2 steps, on the CPU")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--budgets", default=None, help=f"GiB list for every mode (default {ALL_BUDGETS})")
    ap.add_argument("--models-dir", default=None, help="where the synthetic model lives or is written "
                    "(default: harness.synthetic's .cache/models/synthetic-<size>)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the result JSON goes")
    ap.add_argument("--no-noise-check", dest="noise_check", action="store_false",
                    help="skip measuring each mode's first budget a second time")
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args(argv)

    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        ap.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    budgets = a.budgets or ("unlimited" if a.smoke else ALL_BUDGETS)
    parse_budgets(budgets)   # fail here, not in the first child
    if a.smoke and budgets != "unlimited":
        ap.error("--smoke runs on the CPU: only --budgets unlimited")
    size_workload(a)
    if a.smoke:
        a.noise_check = False
    size = "tiny" if a.smoke else "full"
    comfyui_path, model, build_s = comfy_and_model(a, ap)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = utc_now()
    stamp = time.strftime("%Y-%m-%dT%H%M", time.gmtime())
    rows_file = Path(tempfile.mkstemp(prefix=f"{BENCHMARK}_", suffix=".rows.jsonl", dir=out_dir)[1])
    host = host_environment(comfyui_path)
    exit_codes: dict[str, int] = {}
    out_path = None
    for name in modes:
        exit_codes[name] = run_mode(MODES[name], model, budgets, rows_file, a, comfyui_path)
        envs, rows = read_records(rows_file)
        summary = annotate(rows, compare=not a.smoke)
        first_env = next(iter(envs.values()), {})
        env = {**host, **{k: v for k, v in first_env.items() if k in (
            "device_name", "device_total_bytes", "driver", "cuda", "torch", "compute_capability", "pcie_gen_max",
            "pcie_width_max", "pcie_gen_current", "pcie_width_current", "nvml_note")}}
        out_path = out_dir / f"{BENCHMARK}_{'smoke_' if a.smoke else ''}{slug(env.get('device_name') or 'unknown')}_{stamp}.json"
        write_json(out_path, {
            "benchmark": BENCHMARK, "smoke": a.smoke, "started": started, "finished": utc_now(),
            "environment": env, "model": {"path": str(model), "size": size, "build_or_check_s": build_s},
            "modes": {n: {"weight_dtype": MODES[n].weight_dtype, "comfy_argv": list(MODES[n].comfy_argv),
                          "what": MODES[n].what, "exit_code": exit_codes.get(n),
                          **{k: envs.get(n, {}).get(k) for k in ("linear_class", "comfy_fast", "vram_state",
                                                                 "load_s")}} for n in modes},
            "workload": first_env.get("workload"), "budgets": budgets,
            "anchor": {"device": ANCHOR_DEVICE, "s_per_it": {f"{m}@{budget_label(b)}": v
                                                             for (m, b), v in ANCHOR_S_PER_IT.items()}},
            "summary": summary, "rows": rows})
        print(f"[bench] wrote {out_path}", flush=True)
    rows_file.unlink()
    print_table(rows, summary, env)
    print(f"results: {out_path}")
    failed = {m: c for m, c in exit_codes.items() if c != 0}
    if failed:
        print(f"modes that failed (exit code): {failed}")
    return 1 if failed or summary["non_finite"] else 0


if __name__ == "__main__":
    sys.exit(main())
