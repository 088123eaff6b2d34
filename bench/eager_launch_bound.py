"""Is the eager fp8 Linear path bound by the host? Flux-dev's 304 quantized linear layers of one step, run
eagerly through quant.Fp8Linear at 1024x1024 (4096 image + 512 text tokens), with and without a thread that
polls NVML every 2 ms (what bench.nvml_peak.PeakSampler does while a row samples).

Per variant: the host time to issue a step (the loop returns before the GPU finishes: CUDA runs ahead) and
the wall time of a step with a synchronize at the end. Issue time close to wall time = the GPU waits for the
host, so a slower or busier host slows the step. No model file is needed: random weights, Flux's shapes.

    python -m bench.eager_launch_bound --out-dir DIR        # CUDA only; about 30 s on an H200
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch

from .results import RESULTS_DIR, device_environment, host_environment, slug, utc_now, write_json

HIDDEN, IMG, TXT = 3072, 4096, 512
# (in, out, tokens) of each quantized linear in one Flux-dev step, in call order: 19 double blocks (image and
# text stream each: modulation on the pooled vector, qkv, attention projection, MLP in and out), 38 single blocks.
DOUBLE = [(HIDDEN, 6 * HIDDEN, 1), (HIDDEN, 3 * HIDDEN, None), (HIDDEN, HIDDEN, None), (HIDDEN, 4 * HIDDEN, None),
          (4 * HIDDEN, HIDDEN, None)]
SINGLE = [(HIDDEN, 3 * HIDDEN, 1), (HIDDEN, 7 * HIDDEN, IMG + TXT), (5 * HIDDEN, HIDDEN, IMG + TXT)]


# NewBie-image Exp0.1 (harness/synthetic/nextdit.py NEWBIE_FULL): dim 2304, GQA qkv 2304 -> (24 + 2 * 8) * 96,
# SwiGLU 9216, adaLN 1024 -> 4 * 2304 on the pooled vector; 36 layers and 2 noise refiners on image + caption
# tokens (refiners: image only), 2 context refiners on the caption. At 1024x1024: 4096 image tokens per image.
NB_DIM, NB_QKV, NB_FFN, NB_ADALN = 2304, 3840, 9216, 1024


def newbie_block(tokens: int, modulation: bool) -> list[tuple[int, int, int]]:
    mod = [(NB_ADALN, 4 * NB_DIM, 1)] if modulation else []
    return mod + [(NB_DIM, NB_QKV, tokens), (NB_DIM, NB_DIM, tokens), (NB_DIM, NB_FFN, tokens),
                  (NB_DIM, NB_FFN, tokens), (NB_FFN, NB_DIM, tokens)]


def newbie_call_shapes(images: int, caption_tokens: int) -> list[tuple[int, int, int]]:
    """One NewBie model call of `images` images (1: cond or uncond alone, as ComfyUI runs them when their caption
    lengths differ; 2: both in one batch)."""
    img, cap = 4096 * images, caption_tokens * images
    shapes = []
    for _ in range(2):
        shapes += newbie_block(img, True)        # noise refiner
    for _ in range(2):
        shapes += newbie_block(cap, False)       # context refiner
    for _ in range(36):
        shapes += newbie_block(img + cap, True)
    return shapes


MODELS = {"flux": lambda a: step_shapes(),
          "newbie": lambda a: newbie_call_shapes(a.images, a.caption_tokens)}


def step_shapes() -> list[tuple[int, int, int]]:
    shapes = []
    for _ in range(19):
        for tokens in (IMG, TXT):
            shapes += [(i, o, tokens if t is None else t) for i, o, t in DOUBLE]
    for _ in range(38):
        shapes += SINGLE
    return shapes


class NvmlPoller:
    """A thread reading NVML's used memory every `period_s`, as the bench's peak sampler does."""

    def __init__(self, period_s: float = 0.002):
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.period_s, self.stop, self.reads = period_s, threading.Event(), 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            self.reads += 1
            time.sleep(self.period_s)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def measure(layers, inputs, steps: int) -> dict:
    issue, wall = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for layer, x in zip(layers, inputs):
            layer(x)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        issue.append(t1 - t0)
        wall.append(t2 - t0)
    return {"issue_s": statistics.median(issue), "wall_s": statistics.median(wall), "issue_all_s": issue,
            "wall_all_s": wall, "issue_over_wall": statistics.median(issue) / statistics.median(wall)}


def host_profile(layers, inputs, steps: int, top: int = 30) -> list[dict]:
    """cProfile of issuing `steps` calls of every layer (GPU work left to run on): where the host time goes, by
    function, most own time first. Profiling slows Python calls down, so compare shares, not totals."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(steps):
        for layer, x in zip(layers, inputs):
            layer(x)
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler)
    rows = [{"function": f"{Path(file).name}:{line}({name})", "calls": nc, "own_s": tt, "cumulative_s": ct}
            for (file, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items()]
    return sorted(rows, key=lambda r: r["own_s"], reverse=True)[:top]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.eager_launch_bound", description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", choices=sorted(MODELS), default="flux", help="whose linears: Flux-dev's step, or "
                    "one NewBie model call")
    ap.add_argument("--images", type=int, default=1, help="newbie: images in the call (1 or 2)")
    ap.add_argument("--caption-tokens", type=int, default=200, help="newbie: caption tokens per image")
    ap.add_argument("--host-profile", action="store_true", help="also cProfile the fp8 layers' issue loop")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.eager_launch_bound needs a CUDA GPU (it measures kernel launches)")
    from quant import QuantConfig           # quant/ is plain PyTorch: no ComfyUI needed
    from quant.linear import Fp8Linear

    dev = torch.device("cuda")
    shapes = MODELS[a.model](a)
    layers, inputs, cache = [], [], {}
    for i, o, t in shapes:   # one layer object per shape (weights are shared; the host work is per call)
        if (i, o) not in cache:
            lin = torch.nn.Linear(i, o, device=dev, dtype=torch.bfloat16)
            cache[(i, o)] = Fp8Linear.from_linear(lin, QuantConfig(compute="fp8"))
        layers.append(cache[(i, o)])
        inputs.append(torch.randn(t, i, device=dev, dtype=torch.bfloat16))
    bf16 = {k: torch.nn.Linear(k[0], k[1], device=dev, dtype=torch.bfloat16) for k in cache}
    rows = []
    with torch.no_grad():
        for name, run_layers in (("fp8 eager", layers), ("bf16 nn.Linear", [bf16[(i, o)] for i, o, _ in shapes])):
            measure(run_layers, inputs, 3)   # warm-up: Triton and cuBLAS kernels load
            rows.append({"layers": name, "nvml_thread": False, **measure(run_layers, inputs, a.steps)})
            with NvmlPoller() as poller:
                row = measure(run_layers, inputs, a.steps)
            rows.append({"layers": name, "nvml_thread": True, "nvml_reads": poller.reads, **row})
    profile = None
    if a.host_profile:
        with torch.no_grad():
            profile = host_profile(layers, inputs, a.steps)
        for r in profile[:15]:
            print(f"{r['own_s'] * 1e3:8.2f} ms own {r['cumulative_s'] * 1e3:8.2f} ms cum {r['calls']:7d} calls  "
                  f"{r['function']}", flush=True)
    for r in rows:
        print(f"{r['layers']:15s} nvml thread {str(r['nvml_thread']):5s}: issue {r['issue_s'] * 1e3:7.2f} ms, "
              f"wall {r['wall_s'] * 1e3:7.2f} ms, issue/wall {r['issue_over_wall']:.2f}", flush=True)
    env = {**host_environment(None), **device_environment(dev)}
    stamp = time.strftime("%Y-%m-%dT%H%M", time.gmtime())
    tag = "" if a.model == "flux" else f"_{a.model}{a.images}"
    out = Path(a.out_dir) / f"eager_launch_bound{tag}_{slug(env.get('device_name') or 'cuda')}_{stamp}.json"
    write_json(out, {"benchmark": "eager_launch_bound", "finished": utc_now(), "environment": env,
                     "command": env.get("command"), "model": a.model, "images": a.images,
                     "caption_tokens": a.caption_tokens, "layers_per_step": len(shapes), "rows": rows,
                     "host_profile": profile})
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
