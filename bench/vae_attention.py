"""LazyVAEDecode and FlashAttnToggle on the GPU, beside ComfyUI's own VAE Decode and default attention.

    COMFYUI_PATH=... python -m bench.vae_attention --out DIR          # CUDA: the full matrix below
    python -m bench.vae_attention --out DIR --smoke                    # anywhere: tiny sizes, CPU, no ballast

VAE part: the synthetic Flux AE (16 channels, bf16 on the GPU) decodes a random latent at 1024x1024 and
2048x2048, at budgets unlimited / 12 / 4 GiB (a ballast tensor leaves only the budget free), with
ComfyUI's VAEDecode node (`comfy_vaedecode`), LazyVAEDecode in auto mode (`lazy_auto`), the same
without its allocator cap (`lazy_auto_uncapped`: what cuDNN's free choice of workspace costs) and, at the
unlimited budget only, LazyVAEDecode untiled (`lazy_never`, the untiled time). Each row: median seconds
over --repeats (the VAE starts in host memory every time, as after a sampler; ours moves it back after,
ComfyUI's stays), peak device memory above the ballast (NVML; torch's allocator peak beside it), the tile
plan, and the difference to ComfyUI's untiled image.

Attention part: full-size synthetic Flux-dev (1024x1024, batch 1) and SDXL UNet (1024x1024, batch 2 as
with CFG): one diffusion-model forward per "step", timed --attn-repeats times after one warm-up, per
FlashAttnToggle backend (unavailable ones are rows with the install hint), plus `auto` with the choice
its probe made and its probe timings. A step of a real sampler is one such forward.

Writes DIR/vae_attention_<device>_<date>.json (environment, rows, summary with the issue's "done when"
checks) and DIR/vae_attention.rows.jsonl (one row per line, as measured), then prints the tables.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from .ballast import Ballast, GiB, budget_label, parse_budgets
from .nvml_peak import PeakSampler
from .results import device_environment, host_environment, slug, utc_now, write_json
from .table import format_table

BENCHMARK = "vae_attention"
VAE_METHODS = ("comfy_vaedecode", "lazy_auto", "lazy_auto_uncapped", "lazy_never")
UNTILED_ONLY_AT_UNLIMITED = ("lazy_never",)   # an untiled decode at 4 GiB would go to the CPU (minutes)
PEAK_LIMIT_1024_GIB = 2.5                     # issue #5: Flux AE 1024x1024 peak, weights included
TIME_LIMIT_RATIO = 1.3                        # ... in at most 1.3x the untiled time


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.vae_attention", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON result and the rows file")
    ap.add_argument("--smoke", action="store_true", help="tiny models and sizes, ComfyUI with --cpu, no ballast")
    ap.add_argument("--parts", default="vae,attention", help="vae, attention or both (comma-separated)")
    ap.add_argument("--budgets", default="unlimited,12,4", help="GiB list for the VAE part")
    ap.add_argument("--sizes", default=None, help="VAE image sides in px (default 1024,2048; smoke 64)")
    ap.add_argument("--attn-size", type=int, default=None, help="attention image side (default 1024; smoke 32)")
    ap.add_argument("--repeats", type=int, default=None, help="VAE decodes per row (default 3; smoke 1)")
    ap.add_argument("--attn-repeats", type=int, default=None, help="timed forwards per attention row (5; smoke 1)")
    ap.add_argument("--models", default="flux,sdxl", help="attention models: flux, sdxl")
    ap.add_argument("--backends", default="all", help="FlashAttnToggle backends to time (default all)")
    ap.add_argument("--txt-tokens", type=int, default=None, help="Flux T5 context length (256; smoke 8)")
    ap.add_argument("--models-dir", default=None, help="synthetic model folder (default .cache/models/...)")
    a = ap.parse_args(argv)
    smoke = {"sizes": "64", "attn_size": 32, "repeats": 1, "attn_repeats": 1, "txt_tokens": 8}
    full = {"sizes": "1024,2048", "attn_size": 1024, "repeats": 3, "attn_repeats": 5, "txt_tokens": 256}
    for k, v in (smoke if a.smoke else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


class Recorder:
    def __init__(self, out: Path):
        self.rows: list[dict] = []
        self.rows_file = out / f"{BENCHMARK}.rows.jsonl"
        self.rows_file.unlink(missing_ok=True)

    def emit(self, row: dict) -> None:
        self.rows.append(row)
        with self.rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        shown = {k: v for k, v in row.items() if k in ("part", "model", "method", "backend", "size", "budget",
                                                         "time_s", "s_per_it", "peak_gib", "plan", "error")}
        print(f"[bench] {shown}", flush=True)


def measure(fn, device, budget_gib, mm) -> dict:
    """Run fn() once from a clean state (all models unloaded) under the budget; time and peak."""
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    cuda = device.type == "cuda"
    row: dict = {}
    ballast = Ballast(None if budget_gib is None else int(budget_gib * GiB), device) if cuda else None
    try:
        if ballast is not None:
            ballast.__enter__()
            row["free_after_ballast_gib"] = ballast.free_bytes / GiB
            torch.cuda.reset_peak_memory_stats(device)
            alloc0 = torch.cuda.memory_allocated(device)
        with PeakSampler(device) as sampler:
            t0 = time.perf_counter()
            try:
                row["result"] = fn()
            except (torch.OutOfMemoryError, RuntimeError, MemoryError, ValueError) as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if cuda:
                torch.cuda.synchronize(device)
            row["time_s"] = time.perf_counter() - t0
        if cuda:
            row["peak_torch_alloc_gib"] = (torch.cuda.max_memory_allocated(device) - alloc0) / GiB
    finally:
        if ballast is not None:
            ballast.release()
    r = sampler.reading
    row.update(peak_gib=None if r.peak_bytes is None else r.peak_bytes / GiB, peak_source=r.source)
    return row


# ---- VAE ----------------------------------------------------------------------------------------------
def vae_part(a, rec: Recorder, device, mm, models_dir, pack) -> None:
    import comfy.sd
    import comfy.utils
    import nodes as comfy_nodes

    from harness.synthetic import ensure
    path = ensure("flux-ae", "tiny" if a.smoke else "full", models_dir, device="cpu")
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
    vdc = pack["vae"]
    methods = {
        "comfy_vaedecode": lambda s: (comfy_nodes.VAEDecode().decode(vae, s)[0], None),
        "lazy_auto": lambda s: vdc.decode_lazily(vae, s, vdc.DecodeSettings("auto")),
        # the same plan without holding the allocator to it: shows what cuDNN's workspace choice costs
        "lazy_auto_uncapped": lambda s: vdc.decode_lazily(vae, s, vdc.DecodeSettings("auto"),
                                                          pack["tiling"].TilingPolicy(cap_headroom=None)),
        "lazy_never": lambda s: vdc.decode_lazily(vae, s, vdc.DecodeSettings("never")),
    }
    sizes = [int(x) for x in a.sizes.split(",")]
    budgets = [None] if a.smoke else parse_budgets(a.budgets)
    warm = {"samples": torch.randn(1, 16, sizes[0] // 8, sizes[0] // 8)}
    with torch.no_grad():
        for fn in methods.values() if not a.smoke else ():   # kernels load, cuDNN heuristics: not measured
            fn(warm)
    for size in sizes:
        samples = {"samples": torch.randn((1, 16, size // 8, size // 8), generator=torch.Generator().manual_seed(size))}
        reference = None
        for budget in budgets:
            for method, fn in methods.items():
                if budget is not None and method in UNTILED_ONLY_AT_UNLIMITED:
                    continue
                runs = [measure(lambda: fn(samples), device, budget, mm) for _ in range(a.repeats)]
                row = {"part": "vae", "model": "flux-ae", "method": method, "size": size,
                       "budget": budget_label(budget), "budget_gib": budget,
                       "vae_dtype": str(vae.vae_dtype).removeprefix("torch."),
                       "times_s": [r["time_s"] for r in runs],
                       "time_s": statistics.median(r["time_s"] for r in runs),
                       "peak_gib": max((r["peak_gib"] for r in runs if r["peak_gib"] is not None), default=None),
                       "peak_torch_alloc_gib": max((r.get("peak_torch_alloc_gib", 0) for r in runs), default=None),
                       "peak_source": runs[0]["peak_source"],
                       "free_after_ballast_gib": runs[0].get("free_after_ballast_gib"),
                       "vae_loaded_after": vae.patcher in mm.loaded_models()}
                errors = [r["error"] for r in runs if "error" in r]
                if errors:
                    row["error"] = errors[0]
                result = next((r["result"] for r in runs if "result" in r), None)
                if result is not None:
                    image, plan = result
                    if plan is not None:
                        row.update(plan=plan.describe(), tiles=plan.n_tiles, tile_hw=list(plan.tile_hw),
                                   plan_device=plan.device)
                    image = image.float().cpu()
                    if reference is None and method == "comfy_vaedecode" and budget is None:
                        reference = image
                    if reference is not None:
                        d = (image - reference).abs()
                        row.update(diff_vs_comfy_untiled_mean=float(d.mean()), diff_vs_comfy_untiled_max=float(d.max()))
                if budget is not None and row["peak_gib"] is not None:
                    row["within_budget"] = row["peak_gib"] <= budget
                rec.emit(row)
    mm.unload_all_models()


# ---- attention ----------------------------------------------------------------------------------------
def flux_inputs(side: int, txt_tokens: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 16, side // 8, side // 8), generator=g)
    kw = dict(c_crossattn=torch.randn((1, txt_tokens, 4096), generator=g), y=torch.randn((1, 768), generator=g),
              guidance=torch.tensor([3.5]))
    return x, torch.tensor([0.5]), kw                  # sigma 0.5 (flow matching); ComfyUI pads T5 to 256


def sdxl_inputs(side: int, txt_tokens: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, side // 8, side // 8), generator=g)   # CFG: positive + negative
    kw = dict(c_crossattn=torch.randn((2, 77, 2048), generator=g), y=torch.randn((2, 2816), generator=g))
    return x, torch.tensor([7.0, 7.0]), kw              # a mid-schedule sigma


def load_flux(path):
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(path))


def load_sdxl(path):
    import comfy.sd
    return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]


ATTN_MODELS = {   # name -> (synthetic registry name, loader, inputs)
    "flux": ("flux-dev", load_flux, flux_inputs),
    "sdxl": ("sdxl", load_sdxl, sdxl_inputs),
}


def attention_part(a, rec: Recorder, device, mm, models_dir, pack) -> None:
    from harness.synthetic import ensure
    AB, toggle = pack["attn"], pack["toggle"]
    side = a.attn_size
    for name in [m.strip() for m in a.models.split(",") if m.strip()]:
        synth, loader, make_inputs = ATTN_MODELS[name]
        path = ensure(synth, "tiny" if a.smoke else "full", models_dir, device="cuda" if device.type == "cuda" else "cpu")
        mm.unload_all_models()
        t0 = time.perf_counter()
        base = loader(path)
        mm.load_models_gpu([base])             # once: the clones below share these weights
        load_s = time.perf_counter() - t0
        x, t, kw = make_inputs(side, a.txt_tokens)        # apply_model does not move inputs: the sampler would
        x, t = x.to(device), t.to(device)
        kw = {k: v.to(device) for k, v in kw.items()}
        AB.PROBE_CACHE.clear()
        backends = AB.BACKEND_NAMES if a.backends == "all" else [b.strip() for b in a.backends.split(",")]
        for backend in backends:
            row = {"part": "attention", "model": name, "backend": backend, "size": side, "batch": x.shape[0],
                   "load_s": load_s}
            try:
                clone = toggle.FlashAttnToggle().apply(base, backend, "error")[0]
            except ValueError as e:              # not installed / not on this device: the message is the row
                row.update(available=False, error=str(e))
                rec.emit(row)
                continue
            to = clone.model_options["transformer_options"]

            def forward():
                with torch.no_grad():
                    out = clone.model.apply_model(x, t, transformer_options=to, **kw)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return out

            before = Counter(AB.CALLS)
            try:
                forward()                                            # warm-up (auto probes here)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    alloc0 = torch.cuda.memory_allocated(device)
                times = []
                with PeakSampler(device) as sampler:
                    for _ in range(a.attn_repeats):
                        t1 = time.perf_counter()
                        out = forward()
                        times.append(time.perf_counter() - t1)
                row.update(available=True, s_per_it=statistics.median(times), times_s=times,
                           peak_gib=None if sampler.reading.peak_bytes is None else sampler.reading.peak_bytes / GiB,
                           finite=bool(torch.isfinite(out).all()))
                if device.type == "cuda":
                    row["peak_torch_alloc_gib"] = (torch.cuda.max_memory_allocated(device) - alloc0) / GiB
            except (RuntimeError, ValueError, torch.OutOfMemoryError) as e:
                row.update(available=True, error=f"{type(e).__name__}: {str(e).splitlines()[0]}")
            served = Counter(AB.CALLS)
            served.subtract(before)
            row["served_by"] = {k: v for k, v in served.items() if v > 0}
            if backend == "auto":
                row["auto_probe"] = {f"{k[0]}|{str(k[1]).removeprefix('torch.')}|{k[2]}": {"choice": c, "timings_s": tm}
                                     for k, (c, tm) in AB.PROBE_CACHE.items()}
            rec.emit(row)
        del base
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()


# ---- summary and tables -------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> dict:
    s: dict = {"errors": [f"{r.get('method') or r.get('backend')}@{r.get('model')}/{r.get('budget', '')}: {r['error']}"
                          for r in rows if "error" in r and r.get("available", True)]}
    vae = [r for r in rows if r["part"] == "vae"]
    for size in sorted({r["size"] for r in vae}):
        rs = [r for r in vae if r["size"] == size]
        # "untiled time": the same node decoding whole (lazy_never: same load/unload of the weights); the
        # ratio to ComfyUI's VAEDecode (which leaves the VAE loaded, so pays no unload) is shown beside it.
        untiled = {r["method"]: r["time_s"] for r in rs if r["budget_gib"] is None and "error" not in r}
        for r in rs:
            if r["method"] == "lazy_auto" and "lazy_never" in untiled:
                r["time_ratio_to_untiled"] = r["time_s"] / untiled["lazy_never"]
            if r["method"] == "lazy_auto" and "comfy_vaedecode" in untiled:
                r["time_ratio_to_comfy_untiled"] = r["time_s"] / untiled["comfy_vaedecode"]
        auto = [r for r in rs if r["method"] == "lazy_auto"]
        s[f"vae_{size}"] = {
            "lazy_auto_peak_gib_max": max((r["peak_gib"] for r in auto if r["peak_gib"] is not None), default=None),
            "lazy_auto_time_ratio_max": max((r.get("time_ratio_to_untiled", 0) for r in auto), default=None),
            "lazy_auto_over_budget": [r["budget"] for r in auto if r.get("within_budget") is False],
        }
    if 1024 in {r["size"] for r in vae}:
        v = s["vae_1024"]
        v["done_peak"] = v["lazy_auto_peak_gib_max"] is not None and v["lazy_auto_peak_gib_max"] <= PEAK_LIMIT_1024_GIB
        v["done_time"] = v["lazy_auto_time_ratio_max"] is not None and v["lazy_auto_time_ratio_max"] <= TIME_LIMIT_RATIO
    if 2048 in {r["size"] for r in vae}:
        at4 = [r for r in vae if r["size"] == 2048 and r["method"] == "lazy_auto" and r["budget_gib"] == 4.0]
        s["vae_2048"]["done_fits_4gib"] = bool(at4) and all(r.get("within_budget") and "error" not in r for r in at4)
    for model in sorted({r["model"] for r in rows if r["part"] == "attention"}):
        rs = [r for r in rows if r["part"] == "attention" and r["model"] == model and r.get("s_per_it")]
        measured = {r["backend"]: r["s_per_it"] for r in rs if r["backend"] != "auto"}
        auto = next((r for r in rs if r["backend"] == "auto"), None)
        served = (auto or {}).get("served_by") or {}
        choice = max(served, key=served.get) if served else None
        fastest = min(measured, key=measured.get) if measured else None
        s[f"attention_{model}"] = {
            "s_per_it": measured, "fastest": fastest, "auto_choice": choice,
            "auto_s_per_it": auto["s_per_it"] if auto else None,
            "auto_is_fastest": choice == fastest if choice else None,
            "auto_within_3pct_of_fastest": (auto["s_per_it"] <= 1.03 * measured[fastest]) if (auto and fastest) else None,
        }
    return s


def print_tables(rows: list[dict], summary: dict, env: dict) -> None:
    print(f"\n{BENCHMARK}: {env.get('device_name')} (torch {env.get('torch')}, ComfyUI {env.get('comfyui_version')})")
    vae = [r for r in rows if r["part"] == "vae"]
    if vae:
        print(format_table(["size", "budget GiB", "method", "s", "x untiled", "x comfy", "peak GiB", "torch GiB",
                            "<=budget", "plan", "diff mean", "error"],
                           [[r["size"], r["budget"], r["method"], r.get("time_s"), r.get("time_ratio_to_untiled"),
                             r.get("time_ratio_to_comfy_untiled"),
                             r.get("peak_gib"), r.get("peak_torch_alloc_gib"), r.get("within_budget"),
                             (r.get("plan") or "")[:40], r.get("diff_vs_comfy_untiled_mean"),
                             (r.get("error") or "")[:40]] for r in vae]))
    att = [r for r in rows if r["part"] == "attention"]
    if att:
        print(format_table(["model", "size", "backend", "s/it", "peak GiB", "torch GiB", "served by", "error"],
                           [[r["model"], r["size"], r["backend"], r.get("s_per_it"), r.get("peak_gib"),
                             r.get("peak_torch_alloc_gib"), ",".join(r.get("served_by", {})),
                             (r.get("error") or "")[:60]] for r in att], digits=4))
    print("summary: " + json.dumps({k: v for k, v in summary.items() if k != "errors"}, default=str))
    if summary["errors"]:
        print("errors: " + "; ".join(summary["errors"]))


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    from harness.paths import find_comfyui
    from harness.synthetic.cache import default_models_dir

    from .comfy_core_flux import import_comfy
    comfy_path = find_comfyui()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    _args, mm, _sample, _folder_paths, _nodes = import_comfy(str(comfy_path), ["--cpu"] if a.smoke else [])
    from harness.pack_import import import_pack
    import_pack()
    import importlib
    pack = {"vae": importlib.import_module("lowvram_kit.nodes._vae_comfy"),
            "tiling": importlib.import_module("lowvram_kit.nodes._tiling"),
            "attn": importlib.import_module("lowvram_kit.nodes._attention_backends"),
            "toggle": importlib.import_module("lowvram_kit.nodes.flash_attn_toggle")}
    device = mm.get_torch_device()
    models_dir = Path(a.models_dir) if a.models_dir else default_models_dir("tiny" if a.smoke else "full")
    env = {**host_environment(comfy_path), **device_environment(device)}
    rec = Recorder(out)
    parts = {p.strip() for p in a.parts.split(",")}
    if "vae" in parts:
        vae_part(a, rec, device, mm, models_dir, pack)
    if "attention" in parts:
        attention_part(a, rec, device, mm, models_dir, pack)
    summary = summarize(rec.rows)
    path = out / f"{BENCHMARK}_{slug(env.get('device_name') or 'unknown')}_{utc_now()[:10]}.json"
    write_json(path, {"benchmark": BENCHMARK, "smoke": a.smoke, "environment": env, "rows": rec.rows,
                      "summary": summary, "args": vars(a)})
    print_tables(rec.rows, summary, env)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
