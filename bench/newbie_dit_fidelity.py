"""The NewBie DiT's output and model-call time, resident on the GPU: ComfyUI's bf16 model (NewBieDiTLoader's
route) against Float8DiTLoader's fp8 model, with and without the fp8 GEMMs' fast accumulation.

Per variant, one ComfyUI model call of one image (how ComfyUI runs cond and uncond when their caption lengths
differ) at 1024x1024 with `--caption-tokens` tokens: the relative L2 error of the output against bf16's at
three noise levels, and the median time of `--repeat` calls (synchronized), after three warm-up calls. The
full-size synthetic file is written if missing (random weights with the real key names and shapes).

    COMFYUI_PATH=... python -m bench.newbie_dit_fidelity --models-dir /tmp/models --out-dir DIR   # CUDA; ~1 min
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time
from pathlib import Path

import torch

from .anchor import ensure_model
from .comfy_core_flux import import_comfy
from .results import RESULTS_DIR, device_environment, host_environment, slug, utc_now, write_json

TIMESTEPS = (0.9, 0.5, 0.1)   # sigma of the flow: noise-heavy to nearly clean
VARIANTS = ("bf16", "fp8", "fp8_fast_accum")


def inputs(caption_tokens: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(1, 16, 128, 128, generator=g).to(device),
            "ctx": torch.randn(1, caption_tokens, 2560, generator=g).to(device, torch.bfloat16),
            "pooled": torch.randn(1, 1024, generator=g).to(device, torch.bfloat16)}


def call(model, inp: dict, t: float) -> torch.Tensor:
    x = inp["x"]
    with torch.no_grad():
        return model.model.apply_model(x, torch.full((1,), t, device=x.device), c_crossattn=inp["ctx"],
                                       num_tokens=inp["ctx"].shape[1], clip_text_pooled=inp["pooled"],
                                       transformer_options={"wrappers": model.wrappers}).float()


def graphed_call_s(model, inp: dict, repeat: int, want: torch.Tensor) -> dict:
    """The same model call (t = 0.5) captured once in a CUDA graph and replayed: the median seconds of a
    replay (synchronized), and whether its output equals the eager call's bit for bit. What the call costs
    when the host does not issue it kernel by kernel."""
    static = {k: v.clone() for k, v in inp.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            call(model, static, 0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(model, static, 0.5)
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"graph_call_s_median": statistics.median(times), "graph_call_s": times,
            "graph_equals_eager": bool(torch.equal(out.cpu(), want))}


def load(variant: str, path: Path):
    if variant == "bf16":
        return importlib.import_module("lowvram_kit.nodes.comfy_newbie_dit").load_newbie_dit(str(path), torch.bfloat16)
    loading = importlib.import_module("lowvram_kit.nodes.comfy_fp8_loading")
    quant = importlib.import_module("lowvram_kit.quant")
    cfg = loading.Fp8LoadConfig(quant.QuantConfig(compute="fp8"), fast_accum=variant == "fp8_fast_accum")
    return loading.load_fp8_model(str(path), cfg)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.newbie_dit_fidelity", description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--caption-tokens", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--cuda-graphs", action="store_true", help="also time each call captured in a CUDA graph")
    a = ap.parse_args(argv)
    path, _ = ensure_model("full", Path(a.models_dir), "cuda", "newbie")
    _args, mm, _sample, _fp, _nodes = import_comfy(os.environ["COMFYUI_PATH"], [])
    from harness.pack_import import import_pack

    import_pack()
    device = mm.get_torch_device()
    inp = inputs(a.caption_tokens, device)
    outputs, rows = {}, []
    for variant in VARIANTS:
        model = load(variant, path)
        mm.load_models_gpu([model])
        outputs[variant] = [call(model, inp, t).cpu() for t in TIMESTEPS]
        for _ in range(3):
            call(model, inp, 0.5)
        times = []
        for _ in range(a.repeat):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            call(model, inp, 0.5)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        ref = outputs["bf16"]
        rel = [float((o - r).norm() / r.norm()) for o, r in zip(outputs[variant], ref)]
        rows.append({"variant": variant, "call_s_median": statistics.median(times), "call_s": times,
                     "rel_l2_vs_bf16": dict(zip(map(str, TIMESTEPS), rel)),
                     "finite": all(bool(o.isfinite().all()) for o in outputs[variant])})
        print(f"{variant:15s} call {statistics.median(times) * 1e3:7.2f} ms  rel L2 vs bf16 "
              + " ".join(f"t={t}: {e:.4f}" for t, e in zip(TIMESTEPS, rel)), flush=True)
        if a.cuda_graphs:
            try:
                rows[-1].update(graphed_call_s(model, inp, a.repeat, outputs[variant][1]))
                print(f"{variant:15s} graph replay {rows[-1]['graph_call_s_median'] * 1e3:7.2f} ms, "
                      f"equal to eager: {rows[-1]['graph_equals_eager']}", flush=True)
            except Exception as e:  # noqa: BLE001  (a capture failure is a finding, recorded)
                rows[-1]["graph_error"] = f"{type(e).__name__}: {str(e)[:400]}"
                print(f"{variant:15s} graph capture failed: {rows[-1]['graph_error']}", flush=True)
        mm.unload_all_models()
        del model
        torch.cuda.empty_cache()
    fast, plain = outputs["fp8_fast_accum"], outputs["fp8"]
    fast_vs_plain = [float((f - p).norm() / p.norm()) for f, p in zip(fast, plain)]
    print("fp8_fast_accum against fp8, rel L2: " + " ".join(f"{e:.4f}" for e in fast_vs_plain), flush=True)
    env = {**host_environment(os.environ["COMFYUI_PATH"]), **device_environment(device)}
    stamp = time.strftime("%Y-%m-%dT%H%M", time.gmtime())
    out = Path(a.out_dir) / f"newbie_dit_fidelity_{slug(env.get('device_name') or 'cuda')}_{stamp}.json"
    write_json(out, {"benchmark": "newbie_dit_fidelity", "finished": utc_now(), "environment": env,
                     "command": env.get("command"), "caption_tokens": a.caption_tokens, "timesteps": TIMESTEPS,
                     "rows": rows, "fast_vs_plain_rel_l2": fast_vs_plain})
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
