"""VRAMGuard's estimator against NVML: predicted vs measured peak for Flux-dev, NewBie and SDXL (full-size
synthetic models, ComfyUI in-process) at 512-1536 px and batch 1-4, plus the GPU fault-injection and
repeat checks of issue #6.

    python -m bench.vramguard_calibrate --models-dir /tmp/models --out-dir $OUT   # CUDA: the full matrix
    python -m bench.vramguard_calibrate --smoke                                    # anywhere: tiny, CPU

Each sampling row: unload everything, put the ballast for the budget in place, guard the model with
policy "warn" (predicts, changes nothing), sample 2 steps with ComfyUI's own sampler under
bench.nvml_peak.PeakSampler, and compare the guard's prediction with the NVML peak above the level
after the ballast. "adapt" rows run the same under a budget with policy adapt and record whether the
peak stayed under it. Decode rows: the VAE alone (everything else unloaded) decoding B images.
Faults: an APPLY_MODEL wrapper allocates more than is free at a random step (a real CUDA OOM under a
ballast; simulated on the CPU); the guarded run must give the uninjected output. Repeat: prompts in a
row with the guard; allocated memory after the last within 64 MiB of after the first.
Rows stop being measured when --minutes runs out; the JSON (bench/results/vramguard_calibration_*) and
the table are written with what was measured.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .ballast import Ballast, GiB, budget_label
from .nvml_peak import PeakSampler
from .results import REPO_ROOT, RESULTS_DIR, device_environment, host_environment, slug, utc_now, write_json
from .table import format_table

BENCHMARK = "vramguard_calibration"
TOLERANCE = 0.15
MiB = 1 << 20


@dataclass(frozen=True)
class Family:
    model: str              # harness.synthetic name
    vae: str
    channels: int
    cfg: float
    text: tuple[int, int]   # (tokens, width) of the text conditioning
    pooled: int
    budgets_gib: tuple[float, ...]     # extra rows at 1024 px, batch 1 (ComfyUI partial loading)
    adapt_gib: float                   # the adapt row: 1536 px, batch 4 under this budget


FAMILIES = {
    "flux": Family("flux-dev", "flux-ae", 16, 1.0, (256, 4096), 768, (16.0, 8.0), 16.0),
    "newbie": Family("newbie", "flux-ae", 16, 4.5, (512, 2560), 1024, (6.0,), 8.0),
    "sdxl": Family("sdxl", "sdxl-vae", 4, 5.0, (77, 2048), 1280, (4.0,), 6.0),
}


def ensure(name: str, size: str, models_dir: Path, device: str) -> Path:
    cmd = [sys.executable, "-m", "harness.synthetic", "write", name, "--size", size, "--device", device,
           "--models-dir", str(models_dir)]
    print("[bench] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    from harness.synthetic import model_path
    return model_path(name, size, models_dir)


def load(fam: str, path: Path, pack):
    import comfy.sd
    if fam == "flux":
        return comfy.sd.load_diffusion_model(str(path))
    if fam == "newbie":
        return pack.newbie.load_newbie_dit(str(path))
    return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]


def conds(f: Family, seed: int):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn((1, *f.text), generator=g) * 0.5
    extra = {"pooled_output": torch.randn((1, f.pooled), generator=g)}
    if f.model == "flux-dev":
        extra["guidance"] = 3.5
    pos = [[ctx, extra]]
    neg = [[torch.randn((1, *f.text), generator=g) * 0.5, {**extra, "pooled_output": torch.zeros(1, f.pooled)}]]
    return pos, neg


def sample(model, f: Family, side: int, batch: int, steps: int, seed: int = 0):
    import comfy.sample
    latent = torch.zeros(batch, f.channels, side // 8, side // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = conds(f, seed)
    with torch.no_grad():
        return comfy.sample.sample(model, noise, steps, f.cfg, "euler", "simple", pos, neg, latent, seed=seed,
                                   disable_pbar=True)


def clean(mm) -> None:
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


def guard(pack, model, policy: str, budget_gib, headroom_gib: float = 0.0, report: bool = False):
    s = pack.policy.GuardSettings(0 if budget_gib is None else int(budget_gib * GiB), int(headroom_gib * GiB),
                                  policy, 2, report)
    return pack.guard.guard_model(model, s)


def sampling_row(pack, mm, model, fam: str, side: int, batch: int, budget, policy: str, steps: int, device) -> dict:
    f = FAMILIES[fam]
    clean(mm)
    cuda = device.type == "cuda"
    row = {"kind": "sampling", "family": fam, "px": side, "batch": batch, "budget": budget_label(budget),
           "budget_gib": budget, "policy": policy, "cfg": f.cfg}
    ballast = Ballast(None if budget is None else int(budget * GiB), device) if cuda else None
    try:
        if ballast is not None:
            ballast.__enter__()
            torch.cuda.reset_peak_memory_stats(device)
            alloc0 = torch.cuda.memory_allocated(device)
        g, session = guard(pack, model, policy, budget, headroom_gib=0.5 if policy == "adapt" else 0.0)
        t0 = time.perf_counter()
        with PeakSampler(device) as sampler:
            try:
                sample(g, f, side, batch, steps)
            except torch.OutOfMemoryError as e:
                row["error"] = f"CUDA out of memory: {str(e).splitlines()[0][:200]}"
        row["sample_s"] = time.perf_counter() - t0
        if cuda:
            row["peak_torch_alloc_gib"] = (torch.cuda.max_memory_allocated(device) - alloc0) / GiB
            row["loaded_gib"] = model.loaded_size() / GiB
    finally:
        if ballast is not None:
            ballast.release()
    d = session.run.decision if session.run is not None else None
    r = sampler.reading
    row.update(peak_gib=None if r.peak_bytes is None else r.peak_bytes / GiB, peak_source=r.source,
               host_rss_peak_gib=None if r.host_rss_peak_bytes is None else r.host_rss_peak_bytes / GiB)
    if d is not None:
        row.update(verdict=d.verdict, plan=d.plan.describe(batch), placement=session.run.meta.get("placement"),
                   predicted_gib=d.first_estimate.sampling_bytes / GiB,
                   predicted_after_plan_gib=d.estimate.sampling_bytes / GiB,
                   components_gib={k: v / GiB for k, v in d.first_estimate.components.items()},
                   cfg_batch=session.run.meta.get("cfg_batch"), rough=d.estimate.rough)
        session.run.finish("finished")
    pred = row.get("predicted_after_plan_gib" if policy == "adapt" else "predicted_gib")
    if row.get("peak_gib") and pred is not None:
        row["error_rel"] = pred / row["peak_gib"] - 1
        row["within_tolerance"] = abs(row["error_rel"]) <= TOLERANCE
    if budget is not None and row.get("peak_gib") is not None:
        row["within_budget"] = row["peak_gib"] <= budget
    return row


def decode_row(pack, mm, vae, fam: str, side: int, batch: int, device) -> dict:
    E = pack.estimate
    f = FAMILIES[fam]
    clean(mm)
    latent = torch.randn(batch, f.channels, side // 8, side // 8, generator=torch.Generator().manual_seed(1))
    w = E.Workload(family=fam, batch=batch, latent_h=side // 8, latent_w=side // 8, weight_bytes=1,
                   vae_dtype_bytes=torch.empty((), dtype=vae.vae_dtype).element_size())
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    predicted = E.decode_bytes(w, budget_bytes=free, reserve=E.DECODE_RESERVE if device.type == "cuda" else 0)
    t0 = time.perf_counter()
    with PeakSampler(device) as sampler, torch.no_grad():
        vae.decode(latent)
    r = sampler.reading
    row = {"kind": "decode", "family": fam, "vae": f.vae, "px": side, "batch": batch, "budget": "unlimited",
           "predicted_gib": predicted / GiB, "decode_s": time.perf_counter() - t0,
           "peak_gib": None if r.peak_bytes is None else r.peak_bytes / GiB, "peak_source": r.source}
    if row["peak_gib"]:
        row["error_rel"] = row["predicted_gib"] / row["peak_gib"] - 1
        row["within_tolerance"] = abs(row["error_rel"]) <= TOLERANCE
    return row


def fault_runs(pack, mm, model, fam: str, runs: int, side: int, device, steps: int = 4, seed: int = 7) -> dict:
    """OOM at a random model call of a `steps`-step run, `runs` times; outputs must equal the uninjected one."""
    from comfy.patcher_extension import WrappersMP
    f, rng = FAMILIES[fam], random.Random(seed)
    cuda = device.type == "cuda"
    calls_per_run = steps        # one model call per euler step (cond and uncond go as one batch)
    clean(mm)
    ballast = Ballast(int(16 * GiB), device) if cuda else None
    equal, retried, t0 = 0, 0, time.perf_counter()
    try:
        if ballast is not None:
            ballast.__enter__()
        g0, _ = guard(pack, model, "adapt", None)
        ref = sample(g0, f, side, 1, steps, seed)
        for _ in range(runs):
            state = {"n": 0, "at": rng.randint(1, calls_per_run)}

            def inject(executor, x, *args, **kwargs):
                state["n"] += 1
                if state["n"] == state["at"]:
                    if cuda:   # a real allocation the device cannot give
                        torch.empty(torch.cuda.mem_get_info(x.device)[0] + GiB, dtype=torch.uint8, device=x.device)
                    raise torch.OutOfMemoryError("simulated out of memory (CPU smoke run)")
                return executor(x, *args, **kwargs)
            g, session = guard(pack, model, "adapt", None)
            g = g.clone()
            g.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "bench_inject", inject)
            out = sample(g, f, side, 1, steps, seed)
            session.run.finish("finished")
            equal += bool(torch.equal(out, ref))
            retried += len(session.run.events)
    finally:
        if ballast is not None:
            ballast.release()
    return {"kind": "faults", "family": fam, "px": side, "runs": runs, "equal": equal, "retried": retried,
            "real_oom": cuda, "seconds": time.perf_counter() - t0, "ok": equal == runs and retried == runs}


def repeat_runs(pack, mm, model, fam: str, prompts: int, side: int, device, steps: int = 2) -> dict:
    """Prompts in a row with the guard (report on, an OOM every 10th): allocated memory must not grow."""
    cuda = device.type == "cuda"

    def allocated() -> int:
        gc.collect()
        if cuda:
            return torch.cuda.memory_allocated(device)
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096
    clean(mm)
    first, t0 = None, time.perf_counter()
    for i in range(prompts):
        g, session = guard(pack, model, "adapt", None, report=True)
        if i % 10 == 5:
            from comfy.patcher_extension import WrappersMP
            g = g.clone()
            g.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "bench_inject", _raise_once())
        sample(g, FAMILIES[fam], side, 1, steps, seed=i % 3)
        session.run.finish("finished")
        if i == 0:
            first = allocated()
    last = allocated()
    return {"kind": "repeat", "family": fam, "px": side, "prompts": prompts, "first_mib": first / MiB,
            "last_mib": last / MiB, "growth_mib": (last - first) / MiB, "measure": "torch allocated" if cuda
            else "host RSS", "seconds": time.perf_counter() - t0, "ok": abs(last - first) <= 64 * MiB}


def _raise_once():
    state = {"done": False}

    def inject(executor, *args, **kwargs):
        if not state["done"]:
            state["done"] = True
            raise torch.OutOfMemoryError("injected")
        return executor(*args, **kwargs)
    return inject


def import_all(smoke: bool):
    from harness.comfy_inproc import import_comfy
    from harness.pack_import import import_pack
    c = import_comfy(cpu=smoke)
    import_pack()

    class Pack:
        pass
    pack = Pack()
    for attr, mod in (("guard", "comfy_vram_guard"), ("policy", "_vram_policy"), ("estimate", "_vram_estimate"),
                      ("run", "_vram_run"), ("newbie", "comfy_newbie_dit")):
        setattr(pack, attr, importlib.import_module(f"lowvram_kit.nodes.{mod}"))
    return c.model_management, pack


def print_table(rows: list[dict]) -> dict:
    samp = [r for r in rows if r["kind"] in ("sampling", "decode")]
    headers = ["kind", "family", "px", "batch", "budget", "policy", "predicted GiB", "NVML peak GiB", "error",
               "within 15%", "<= budget", "plan"]
    print(format_table(headers, [[r["kind"], r["family"], r["px"], r["batch"], r["budget"], r.get("policy", "-"),
                                  r.get("predicted_after_plan_gib" if r.get("policy") == "adapt" else "predicted_gib"),
                                  r.get("peak_gib"), None if r.get("error_rel") is None else
                                  f"{100 * r['error_rel']:+.1f}%", r.get("within_tolerance"), r.get("within_budget"),
                                  r.get("plan", "-")] for r in samp], digits=2))
    for r in rows:
        if r["kind"] in ("faults", "repeat"):
            print(f"{r['kind']}: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in r.items() if k != "kind"))
    checked = [r for r in samp if "within_tolerance" in r]
    return {"rows_checked": len(checked), "rows_within_tolerance": sum(r["within_tolerance"] for r in checked),
            "tolerance": TOLERANCE, "worst_error": max((abs(r["error_rel"]) for r in checked), default=None),
            "over_budget": [f"{r['family']}@{r['px']}x{r['batch']}/{r['budget']}" for r in rows
                            if r.get("within_budget") is False],
            "errors": [r["error"] for r in rows if "error" in r],
            "faults_ok": all(r["ok"] for r in rows if r["kind"] == "faults"),
            "repeat_ok": all(r["ok"] for r in rows if r["kind"] == "repeat")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vramguard_calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, 64 px, on the CPU")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--sizes", default=None, help="px list (default 512,1024,1536; smoke 64)")
    ap.add_argument("--batches", default=None, help="default 1,2,4; smoke 1,2")
    ap.add_argument("--steps", type=int, default=None, help="steps per sampling row (default 2; smoke 1)")
    ap.add_argument("--faults", type=int, default=None, help="fault-injection runs (default 50; smoke 2)")
    ap.add_argument("--repeat", type=int, default=None, help="prompts in a row (default 100; smoke 3)")
    ap.add_argument("--fault-family", default=None, help="family of the fault and repeat runs (default sdxl, "
                    "or the last of --families)")
    ap.add_argument("--minutes", type=float, default=8.0, help="stop measuring new rows after this")
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    a = ap.parse_args(argv)
    fams = [x.strip() for x in a.families.split(",") if x.strip()]
    bad = [x for x in fams if x not in FAMILIES]
    if bad or not fams:
        ap.error(f"--families: unknown {bad}; choose from {', '.join(FAMILIES)}")
    sizes = [int(x) for x in (a.sizes or ("64" if a.smoke else "512,1024,1536")).split(",")]
    batches = [int(x) for x in (a.batches or ("1,2" if a.smoke else "1,2,4")).split(",")]
    if any(s % 64 for s in sizes) or any(b < 1 for b in batches):
        ap.error("--sizes must be multiples of 64 px and --batches >= 1")
    fault_family = a.fault_family or ("sdxl" if "sdxl" in fams else fams[-1])
    if fault_family not in fams:
        ap.error(f"--fault-family {fault_family} is not among --families {fams}")
    # the fault family first: its fault and repeat runs must not be cut by --minutes; Flux (largest) last
    fams = [fault_family] + [x for x in fams if x != fault_family]
    faults = a.faults if a.faults is not None else (2 if a.smoke else 50)
    a.steps = a.steps or (1 if a.smoke else 2)
    if a.smoke:   # short prompts: NewBie's 512 caption tokens would dominate a 64-px image on the CPU
        FAMILIES.update({k: replace(v, text=(min(v.text[0], 16), v.text[1])) for k, v in FAMILIES.items()})
    if a.steps < 1:
        ap.error("--steps must be >= 1")
    repeat = a.repeat if a.repeat is not None else (3 if a.smoke else 100)
    size_name, dev_name = ("tiny", "cpu") if a.smoke else ("full", "cuda")
    models_dir = Path(a.models_dir) if a.models_dir else REPO_ROOT / ".cache" / "models" / f"synthetic-{size_name}"
    t_start, started = time.perf_counter(), utc_now()
    deadline = t_start + a.minutes * 60

    mm, pack = import_all(a.smoke)
    import comfy.sd
    import comfy.utils
    import folder_paths
    folder_paths.set_output_directory(tempfile.mkdtemp(prefix="vramguard_reports_"))
    pack.run.TAIL_S = 0.05
    device = mm.get_torch_device()
    rows: list[dict] = []
    skipped = 0
    for fam in fams:
        f = FAMILIES[fam]
        path, vae_path = ensure(f.model, size_name, models_dir, dev_name), ensure(f.vae, size_name, models_dir, dev_name)
        model = load(fam, path, pack)
        # warm-up: the first sampling of a process loads kernels and cuBLAS workspaces into the context
        # (+0.2 GiB in the anchor's first row); rows measure from a warm context
        sample(model, f, min(sizes), 1, 1)
        plan = [(s, b, None, "warn") for s in sizes for b in batches]
        if not a.smoke:
            plan += [(1024, 1, g, "warn") for g in f.budgets_gib] + [(max(sizes), max(batches), f.adapt_gib, "adapt")]
        for side, batch, budget, policy in plan:
            if time.perf_counter() > deadline:
                skipped += 1
                continue
            row = sampling_row(pack, mm, model, fam, side, batch, budget, policy, a.steps, device)
            rows.append(row)
            print(f"[bench] {fam} {side}px x{batch} budget={row['budget']} {policy}: predicted "
                  f"{row.get('predicted_gib', float('nan')):.2f} GiB, peak {row.get('peak_gib') or float('nan'):.2f} GiB "
                  f"({row.get('error_rel', float('nan')):+.1%}) {row.get('plan', '')}", flush=True)
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_path)))
        for side in sizes:
            for batch in (min(batches), max(batches)):
                if time.perf_counter() <= deadline:
                    rows.append(decode_row(pack, mm, vae, fam, side, batch, device))
        del vae
        if fam == fault_family:
            rows.append(fault_runs(pack, mm, model, fam, faults, min(sizes), device, steps=2 if a.smoke else 4))
            rows.append(repeat_runs(pack, mm, model, fam, repeat, min(sizes), device, steps=a.steps))
            print(f"[bench] {fam}: {rows[-2]['equal']}/{faults} fault runs equal, memory growth over {repeat} "
                  f"prompts {rows[-1]['growth_mib']:+.1f} MiB ({time.perf_counter() - t_start:.0f} s)", flush=True)
        del model
        clean(mm)
    summary = print_table(rows)
    summary.update(skipped_rows=skipped, seconds=time.perf_counter() - t_start)
    env = {**host_environment(None), **device_environment(device)}
    stamp = time.strftime("%Y-%m-%dT%H%M", time.gmtime())
    out = Path(a.out_dir) / f"{BENCHMARK}_{'smoke_' if a.smoke else ''}{slug(env.get('device_name') or 'cpu')}_{stamp}.json"
    write_json(out, {"benchmark": BENCHMARK, "smoke": a.smoke, "started": started, "finished": utc_now(),
                     "environment": env, "settings": {"sizes": sizes, "batches": batches, "steps": a.steps,
                                                      "families": fams, "faults": faults, "repeat": repeat,
                                                      "fault_family": fault_family},
                     "calibration": pack.estimate.CALIBRATION, "summary": summary, "rows": rows})
    print(f"summary: {summary}\nresults: {out}", flush=True)
    ok = summary["faults_ok"] and summary["repeat_ok"] and not summary["over_budget"]
    return 0 if (a.smoke or ok) else 1


if __name__ == "__main__":
    sys.exit(main())
