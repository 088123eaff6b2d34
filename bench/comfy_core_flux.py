"""One ComfyUI-core process: load synthetic Flux-dev with one weight option, then sample at each budget.

`bench.anchor` starts one of these per mode, because ComfyUI reads its command-line flags
(`--fast fp8_matrix_mult`, `--cpu`) once, when `comfy.cli_args` is first imported; everything after
`--` is handed to ComfyUI as its own argv, the way its main.py does it.

    COMFYUI_PATH=... python -m bench.comfy_core_flux --model DIR/diffusion_models/flux1-dev.safetensors \
        --weight-dtype fp8_e4m3fn_fast --budgets unlimited,8,4 --rows-out rows.jsonl -- --fast fp8_matrix_mult

Each line of --rows-out is a JSON object: first {"kind": "env", ...}, then {"kind": "row", ...} per
budget, flushed as soon as it is measured, so a run cut short still leaves its rows.
Everything ComfyUI does is ComfyUI's own code: UNETLoader.load_unet, comfy.sample.sample (euler,
simple), model_management.unload_all_models; only the text encoders are replaced by random
conditioning of the right shapes (T5: [1, tokens, 4096]; CLIP-L pooled: [1, 768]).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .ballast import Ballast, GiB, budget_label, parse_budgets
from .nvml_peak import PeakSampler
from .results import device_environment
from .table import fmt

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")   # UNETLoader's options


@dataclass(frozen=True)
class FluxWorkload:
    width: int = 1024
    height: int = 1024
    steps: int = 5
    txt_tokens: int = 256           # T5 sequence length ComfyUI pads Flux prompts to
    guidance: float = 3.5           # FluxGuidance default
    cfg: float = 1.0                # Flux-dev is guidance-distilled: no negative pass
    sampler: str = "euler"
    scheduler: str = "simple"
    seed: int = 0

    def __post_init__(self):
        for name in ("width", "height"):
            v = getattr(self, name)
            if v < 16 or v % 16:
                raise ValueError(f"FluxWorkload.{name}={v}: must be a multiple of 16 (8x VAE, 2x2 patches)")
        if self.steps < 2:
            raise ValueError(f"FluxWorkload.steps={self.steps}: need >= 2 (the first step is dropped)")
        if self.txt_tokens < 1:
            raise ValueError(f"FluxWorkload.txt_tokens={self.txt_tokens}: must be >= 1")

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (1, 16, self.height // 8, self.width // 8)   # what EmptySD3LatentImage makes


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


def make_inputs(w: FluxWorkload):
    """Random conditioning + empty latent, fixed by the seed (CPU generator: same on every machine)."""
    g = torch.Generator("cpu").manual_seed(w.seed)
    cond = torch.randn((1, w.txt_tokens, 4096), generator=g).to(torch.bfloat16)     # T5-XXL output
    pooled = torch.randn((1, 768), generator=g).to(torch.bfloat16)                   # CLIP-L pooled
    positive = [[cond, {"pooled_output": pooled, "guidance": w.guidance}]]
    negative = [[torch.zeros_like(cond), {"pooled_output": torch.zeros_like(pooled), "guidance": w.guidance}]]
    latent = torch.zeros(w.latent_shape)
    return positive, negative, latent


def linear_class(model) -> str:
    """Which ComfyUI ops class the Linear layers got (shows whether fp8 matmul is in effect)."""
    for m in model.model.diffusion_model.modules():
        if isinstance(m, torch.nn.Linear):
            return f"{type(m).__module__}.{type(m).__qualname__}"
    return "none"


def sample_once(model, w: FluxWorkload, inputs, budget_gib, device, mm, comfy_sample,
                latent_path: Path | None = None) -> dict:
    """Unload everything, put the ballast in place, sample, measure. One result row; the output latent
    [1, 16, H/8, W/8] goes to `latent_path` (torch.save) when given, for accuracy comparisons."""
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
        if ballast is not None:
            ballast.release()
    steps_s = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    row.update(
        steps_done=len(stamps),
        step_s=steps_s,
        first_step_s=steps_s[0] if steps_s else None,     # includes ComfyUI moving weights to the GPU
        s_per_it=statistics.mean(steps_s[1:]) if len(steps_s) >= 2 else None,
        sample_s=t_end - t0,
        peak_gib=None if reading.peak_bytes is None else reading.peak_bytes / GiB,
        peak_source=reading.source,
        peak_samples=reading.samples,
        host_rss_peak_gib=None if reading.host_rss_peak_bytes is None else reading.host_rss_peak_bytes / GiB,
        latent_finite=None if out is None else bool(torch.isfinite(out).all()),
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, comfy_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(prog="python -m bench.comfy_core_flux", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a Flux-dev .safetensors file")
    ap.add_argument("--weight-dtype", default="default", choices=WEIGHT_DTYPES)
    ap.add_argument("--mode", default=None, help="label written into each row (default: --weight-dtype)")
    ap.add_argument("--budgets", default="unlimited", help="GiB list, e.g. unlimited,24,16,12")
    ap.add_argument("--rows-out", required=True, help="JSON-lines file to append results to")
    ap.add_argument("--noise-check", action="store_true", help="measure the first budget again at the end")
    ap.add_argument("--latent-out", default=None, help="folder for each row's output latent (<mode>_<budget>.pt)")
    for f in ("width", "height", "steps", "txt_tokens", "seed"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(FluxWorkload, f))
    a = ap.parse_args(ours)
    w = FluxWorkload(width=a.width, height=a.height, steps=a.steps, txt_tokens=a.txt_tokens, seed=a.seed)
    budgets = parse_budgets(a.budgets)
    model_path = Path(a.model).resolve()
    if not model_path.is_file():
        raise SystemExit(f"--model {model_path} does not exist; build it with "
                         "python -m harness.synthetic write flux-dev --size full")
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        raise SystemExit("COMFYUI_PATH is not set: point it at a ComfyUI tree (the folder with main.py)")

    logging.basicConfig(level=logging.INFO, format="[comfy] %(message)s")   # ComfyUI logs partial loads
    comfy_args, mm, comfy_sample, folder_paths, nodes = import_comfy(comfyui_path, comfy_argv)
    device = mm.get_torch_device()
    mode = a.mode or a.weight_dtype
    rows_out = Path(a.rows_out)
    rows_out.parent.mkdir(parents=True, exist_ok=True)

    def emit(record: dict) -> None:
        with rows_out.open("a") as f:
            f.write(json.dumps(record) + "\n")

    # ComfyUI finds diffusion models by folder + file name, as UNETLoader's widget does.
    folder_paths.add_model_folder_path("diffusion_models", str(model_path.parent), is_default=True)
    t0 = time.perf_counter()
    (model,) = nodes.UNETLoader().load_unet(model_path.name, a.weight_dtype)
    load_s = time.perf_counter() - t0
    env = {"kind": "env", "mode": mode, **device_environment(device), "comfy_argv": comfy_argv,
           "comfy_fast": sorted(f.value for f in comfy_args.fast), "weight_dtype": a.weight_dtype,
           "vram_state": mm.vram_state.name, "linear_class": linear_class(model), "load_s": load_s,
           "workload": asdict(w), "model": str(model_path), "model_file_bytes": model_path.stat().st_size}
    emit(env)
    print(f"[bench] {mode}: loaded {model_path.name} as {a.weight_dtype} in {load_s:.1f} s "
          f"({env['linear_class']}, fast={env['comfy_fast']}, {env['device_name']})", flush=True)

    inputs = make_inputs(w)
    plan = budgets + ([budgets[0]] if a.noise_check else [])
    for i, budget in enumerate(plan):
        latent = (Path(a.latent_out) / f"{mode}_{budget_label(budget)}{'_again' if i >= len(budgets) else ''}.pt"
                  if a.latent_out else None)
        row = sample_once(model, w, inputs, budget, device, mm, comfy_sample, latent)
        row.update(kind="row", mode=mode, weight_dtype=a.weight_dtype, comfy_argv=comfy_argv, load_s=load_s,
                   repeat=i >= len(budgets))
        emit(row)
        print(f"[bench] {mode} budget={row['budget']:>9}: s/it={fmt(row['s_per_it'], 4)} "
              f"first={fmt(row['first_step_s'], 2)}s peak={fmt(row['peak_gib'], 2)} GiB "
              f"loaded={fmt(row.get('loaded_gib'), 2)} GiB finite={fmt(row['latent_finite'])}"
              + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)
    mm.unload_all_models()
    return 0


if __name__ == "__main__":
    sys.exit(main())
