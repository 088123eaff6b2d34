"""One ComfyUI-core process: load a synthetic model (Flux-dev; --family newbie or sdxl for the others) with
one or more weight options, then sample at each budget.

`bench.anchor` starts one of these per mode, because ComfyUI reads its command-line flags
(`--fast fp8_matrix_mult`, `--cpu`) once, when `comfy.cli_args` is first imported; everything after
`--` is handed to ComfyUI as its own argv, the way its main.py does it. Weight dtypes that need the same
flags can share a process: `--weight-dtype default,fp8_e4m3fn --mode comfy_bf16,comfy_fp8`.

    COMFYUI_PATH=... python -m bench.comfy_core_flux --model DIR/diffusion_models/flux1-dev.safetensors \
        --weight-dtype fp8_e4m3fn_fast --budgets unlimited,8,4 --rows-out rows.jsonl -- --fast fp8_matrix_mult

Each line of --rows-out is a JSON object: {"kind": "env", ...} per weight dtype, then {"kind": "row", ...}
per budget, flushed as soon as it is measured, so a run cut short still leaves its rows; a row that raised
holds "error" and the rows after it still run (the exit code is then 1).
Everything ComfyUI does is ComfyUI's own code: UNETLoader.load_unet, comfy.sample.sample (euler,
simple), model_management.unload_all_models; only the text encoders are replaced by random
conditioning of the right shapes (bench.workload: T5 [1, tokens, 4096] and CLIP-L pooled [1, 768] for Flux).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .ballast import Ballast, GiB, budget_label, parse_budgets
from .nvml_peak import PeakSampler
from .results import device_environment
from .table import fmt
from .workload import FAMILY_INPUTS, Workload, make_inputs, workload_for

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")   # UNETLoader's options
FluxWorkload = Workload   # its name before other families came (bench.fp8_flux_ours imports it)


def import_comfy(comfyui_path: str, comfy_argv: list[str]):
    """Import ComfyUI with `comfy_argv` as its command line; returns the modules used here."""
    if not (Path(comfyui_path) / "comfy").is_dir():
        raise FileNotFoundError(f"COMFYUI_PATH={comfyui_path} holds no comfy/ folder; point it at the "
                                "ComfyUI tree (the folder with main.py)")
    sys.path.insert(0, str(comfyui_path))
    saved_argv = sys.argv
    sys.argv = [str(Path(comfyui_path) / "main.py"), *comfy_argv]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args   # parses sys.argv now, before model_management reads args
    finally:
        sys.argv = saved_argv
    import comfy.model_management as mm
    import comfy.sample
    import folder_paths
    import nodes
    return comfy.cli_args.args, mm, comfy.sample, folder_paths, nodes


def linear_class(model) -> str:
    """Which ComfyUI ops class the Linear layers got (shows whether fp8 matmul is in effect)."""
    for m in model.model.diffusion_model.modules():
        if isinstance(m, torch.nn.Linear):
            return f"{type(m).__module__}.{type(m).__qualname__}"
    return "none"


def latent_digest(out: torch.Tensor) -> str:
    """SHA-256 of the output latent's bytes [B, C, H/8, W/8]: equal digests = the same bits (offload fidelity)."""
    return hashlib.sha256(out.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def sample_once(model, w: Workload, inputs, budget_gib, device, mm, comfy_sample,
                latent_path: Path | None = None) -> dict:
    """Unload everything, put the ballast in place, sample, measure. One result row; the output latent
    [1, C, H/8, W/8] goes to `latent_path` (torch.save) when given, for accuracy comparisons."""
    positive, negative, latent = inputs
    mm.unload_all_models()
    mm.soft_empty_cache()
    gc.collect()
    cuda = device.type == "cuda"
    if not cuda and budget_gib is not None:
        raise ValueError(f"budget {budget_gib} GiB needs a CUDA device; on {device} use 'unlimited'")
    noise = comfy_sample.prepare_noise(latent, w.seed)
    stamps: list[float] = []

    def on_step(step, x0, x, total_steps):
        if cuda:
            torch.cuda.synchronize(device)   # time the step's kernels, not just their launch
        stamps.append(time.perf_counter())

    row = {"budget_gib": budget_gib, "budget": budget_label(budget_gib)}
    budget_bytes = None if budget_gib is None else int(budget_gib * GiB)
    ballast = Ballast(budget_bytes, device) if cuda else None
    # Batch of each diffusion-model forward: CFG runs cond and uncond as one batch of 2 when ComfyUI finds
    # the memory, else as two passes, and offloaded weights are copied once per pass.
    batches: list[int] = []
    def count_pass(_module, args, kwargs):
        batches.append(int((args[0] if args else kwargs["x"]).shape[0]))
    hook = model.model.diffusion_model.register_forward_pre_hook(count_pass, with_kwargs=True)
    try:
        if ballast is not None:
            ballast.__enter__()
            row["free_after_ballast_gib"] = ballast.free_bytes / GiB
            torch.cuda.reset_peak_memory_stats(device)
            alloc0 = torch.cuda.memory_allocated(device)
        with PeakSampler(device) as sampler:
            t0 = time.perf_counter()
            try:
                out = comfy_sample.sample(model, noise, w.steps, w.cfg, w.sampler, w.scheduler, positive,
                                          negative, latent, callback=on_step, disable_pbar=True, seed=w.seed)
            except torch.OutOfMemoryError as e:
                row["error"] = f"CUDA out of memory: {str(e).splitlines()[0]}"
                out = None
            t_end = time.perf_counter()
        reading = sampler.reading
        if cuda:
            row["peak_torch_alloc_gib"] = (torch.cuda.max_memory_allocated(device) - alloc0) / GiB
            row["loaded_gib"] = model.loaded_size() / GiB
        row["model_gib"] = model.model_size() / GiB
    finally:
        hook.remove()
        if ballast is not None:
            ballast.release()
    steps_s = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    row.update(
        steps_done=len(stamps),
        step_s=steps_s,
        first_step_s=steps_s[0] if steps_s else None,     # includes ComfyUI moving weights to the GPU
        # The median of steps 2..N: a one-time cost inside one of them (ChunkedOffloadUNet re-plans after timing
        # its blocks in step 2; a compile) does not count as a per-step cost of a 20-step run, for any row.
        s_per_it=statistics.median(steps_s[1:]) if len(steps_s) >= 2 else None,
        s_per_it_mean=statistics.mean(steps_s[1:]) if len(steps_s) >= 2 else None,
        sample_s=t_end - t0,
        peak_gib=None if reading.peak_bytes is None else reading.peak_bytes / GiB,
        peak_source=reading.source,
        peak_samples=reading.samples,
        host_rss_peak_gib=None if reading.host_rss_peak_bytes is None else reading.host_rss_peak_bytes / GiB,
        latent_finite=None if out is None else bool(torch.isfinite(out).all()),
        latent_sha256=None if out is None else latent_digest(out),
        passes=len(batches),
        passes_per_step=len(batches) / len(stamps) if stamps else None,
        pass_batches=sorted(set(batches)),
    )
    if reading.note:
        row["peak_note"] = reading.note
    if latent_path is not None and out is not None:
        latent_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out.detach().to("cpu", torch.float32), latent_path)
        row["latent_file"] = str(latent_path)
    if budget_gib is not None and row["peak_gib"] is not None:
        row["within_budget"] = row["peak_gib"] <= budget_gib
    return row


def with_torch_compile(model):
    """A clone of the ModelPatcher compiled the way ComfyUI's TorchCompileModel node does it (inductor,
    the whole diffusion model, applied at sampling time through an APPLY_MODEL wrapper)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    compiled = model.clone()
    set_torch_compile_wrapper(model=compiled, backend="inductor")
    return compiled


def graph_breaks() -> dict:
    """torch._dynamo's graph-break reasons so far in this process (reason -> count): 0 is the goal."""
    from torch._dynamo.utils import counters
    return {str(k)[:200]: v for k, v in counters.get("graph_break", {}).items()}


def error_row(budget_gib, e: Exception) -> dict:
    """The row of a measurement that raised: recorded, so the rows after it still run (one GPU call)."""
    return {"budget_gib": budget_gib, "budget": budget_label(budget_gib), "s_per_it": None,
            "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}


def measure_mode(mode: str, weight_dtype: str, a, w: Workload, comfy, emit) -> int:
    """Load the model with one UNETLoader weight dtype and sample at each budget; returns rows that failed."""
    comfy_args, mm, comfy_sample, nodes, comfy_argv = comfy
    model_path, budgets = Path(a.model).resolve(), parse_budgets(a.budgets)
    device = mm.get_torch_device()
    try:
        t0 = time.perf_counter()
        (model,) = nodes.UNETLoader().load_unet(model_path.name, weight_dtype)
        load_s = time.perf_counter() - t0
        if a.torch_compile:
            model = with_torch_compile(model)
    except Exception as e:  # noqa: BLE001  (the next mode may load: record, go on)
        for budget in budgets:
            emit({**error_row(budget, e), "kind": "row", "mode": mode, "weight_dtype": weight_dtype})
        return len(budgets)
    env = {"kind": "env", "mode": mode, **device_environment(device), "comfy_argv": comfy_argv,
           "comfy_fast": sorted(f.value for f in comfy_args.fast), "weight_dtype": weight_dtype,
           "vram_state": mm.vram_state.name, "torch_compile": a.torch_compile, "linear_class": linear_class(model),
           "load_s": load_s,
           "workload": asdict(w), "model": str(model_path), "model_file_bytes": model_path.stat().st_size}
    emit(env)
    print(f"[bench] {mode}: loaded {model_path.name} as {weight_dtype} in {load_s:.1f} s "
          f"({env['linear_class']}, fast={env['comfy_fast']}, {env['device_name']})", flush=True)
    inputs = make_inputs(w)
    plan = budgets + ([budgets[0]] if a.noise_check else [])
    failed = 0
    for i, budget in enumerate(plan):
        latent = (Path(a.latent_out) / f"{mode}_{budget_label(budget)}{'_again' if i >= len(budgets) else ''}.pt"
                  if a.latent_out else None)
        try:
            row = sample_once(model, w, inputs, budget, device, mm, comfy_sample, latent)
        except Exception as e:  # noqa: BLE001  (an out-of-memory is a result, recorded by sample_once)
            row = error_row(budget, e)
            failed += 1
        row.update(kind="row", mode=mode, weight_dtype=weight_dtype, comfy_argv=comfy_argv, load_s=load_s,
                   repeat=i >= len(budgets))
        if a.torch_compile:
            row["graph_breaks"] = graph_breaks()
        emit(row)
        print(f"[bench] {mode} budget={row['budget']:>9}: s/it={fmt(row['s_per_it'], 4)} "
              f"first={fmt(row.get('first_step_s'), 2)}s peak={fmt(row.get('peak_gib'), 2)} GiB "
              f"loaded={fmt(row.get('loaded_gib'), 2)} GiB finite={fmt(row.get('latent_finite'))}"
              + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)
    mm.unload_all_models()
    del model
    gc.collect()
    mm.soft_empty_cache()
    return failed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, comfy_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(prog="python -m bench.comfy_core_flux", description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="flux", choices=sorted(FAMILY_INPUTS), help="whose inputs to make")
    ap.add_argument("--model", required=True, help="a diffusion model .safetensors file (or a checkpoint: "
                    "UNETLoader takes its UNet)")
    ap.add_argument("--weight-dtype", default="default", help="UNETLoader weight dtype, or a comma list of "
                    f"them measured one after the other ({', '.join(WEIGHT_DTYPES)})")
    ap.add_argument("--mode", default=None, help="label written into each row, a comma list matching "
                    "--weight-dtype (default: the weight dtypes)")
    ap.add_argument("--budgets", default="unlimited", help="GiB list, e.g. unlimited,24,16,12")
    ap.add_argument("--rows-out", required=True, help="JSON-lines file to append results to")
    ap.add_argument("--noise-check", action="store_true", help="measure the first budget again at the end")
    ap.add_argument("--latent-out", default=None, help="folder for each row's output latent (<mode>_<budget>.pt)")
    ap.add_argument("--torch-compile", action="store_true", help="compile the diffusion model as ComfyUI's "
                    "TorchCompileModel node does (inductor; the first step of each row includes compiling)")
    fields = ("width", "height", "steps", "txt_tokens", "seed")
    for f in fields:
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None, help="default: the family's")
    a = ap.parse_args(ours)
    dtypes = a.weight_dtype.split(",")
    modes = a.mode.split(",") if a.mode else dtypes
    if [d for d in dtypes if d not in WEIGHT_DTYPES] or len(modes) != len(dtypes):
        ap.error(f"--weight-dtype {a.weight_dtype!r} / --mode {a.mode!r}: weight dtypes from "
                 f"{', '.join(WEIGHT_DTYPES)}, and one mode label per weight dtype")
    w = workload_for(a.family, **{f: getattr(a, f) for f in fields if getattr(a, f) is not None})
    parse_budgets(a.budgets)   # fail here, before ComfyUI starts
    model_path = Path(a.model).resolve()
    if not model_path.is_file():
        raise SystemExit(f"--model {model_path} does not exist; build it with "
                         "python -m harness.synthetic write NAME --size full (flux-dev, newbie, sdxl)")
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        raise SystemExit("COMFYUI_PATH is not set: point it at a ComfyUI tree (the folder with main.py)")

    logging.basicConfig(level=logging.INFO, format="[comfy] %(message)s")   # ComfyUI logs partial loads
    comfy_args, mm, comfy_sample, folder_paths, nodes = import_comfy(comfyui_path, comfy_argv)
    rows_out = Path(a.rows_out)
    rows_out.parent.mkdir(parents=True, exist_ok=True)

    def emit(record: dict) -> None:
        with rows_out.open("a") as f:
            f.write(json.dumps(record) + "\n")

    # ComfyUI finds diffusion models by folder + file name, as UNETLoader's widget does.
    folder_paths.add_model_folder_path("diffusion_models", str(model_path.parent), is_default=True)
    failed = sum(measure_mode(mode, dtype, a, w, (comfy_args, mm, comfy_sample, nodes, comfy_argv), emit)
                 for mode, dtype in zip(modes, dtypes))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
