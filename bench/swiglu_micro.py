"""The fused fp8 SwiGLU (quant.swiglu) on one NewBie feed-forward (2304 -> 2 x 9216 -> 2304) at 1024x1024: its
bits against the layer-by-layer path, and the GPU time of one call, bf16, fp8 layer by layer, and fused.

Checks (each must hold, else the run exits 1): the Triton silu-product quantizer's codes and scales equal
PyTorch's silu and product followed by the per-token quantizer the unfused path uses; the fused
feed-forward's output equals the unfused one.
Times: CUDA events around each of `--repeat` calls, after three warm-up calls; the median. No model file.

    python -m bench.swiglu_micro --out-dir DIR       # CUDA with fp8 GEMM (compute capability 8.9+); ~20 s
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .fp8_linear_micro import time_call
from .results import RESULTS_DIR, device_environment, host_environment, slug, utc_now, write_json

DIM, HIDDEN, IMAGE_TOKENS = 2304, 9216, 4096
FFNS_PER_CALL = 36 + 2   # layers and noise refiners run on image + caption tokens (context refiners: caption only)


def timed_ms(fn, repeat: int) -> dict:
    """Median milliseconds of one call, CUDA events around each (bench.fp8_linear_micro.time_call)."""
    return {"median_ms": time_call(fn, torch.device("cuda"), warmup=3, reps=repeat) * 1e3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.swiglu_micro", description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--caption-tokens", type=int, default=300, help="caption tokens beside the 4096 image tokens")
    ap.add_argument("--repeat", type=int, default=50)
    a = ap.parse_args(argv)
    from quant import quantize_weight           # plain PyTorch: no ComfyUI needed
    from quant.matmul import fp8_matmul_supported
    from quant.swiglu import Fp8Weights, fp8_swiglu, fp8_swiglu_takes, silu_mul_eager, swiglu_unfused
    from quant.swiglu_triton import launch_silu_mul_

    if not torch.cuda.is_available() or not fp8_matmul_supported("cuda"):
        raise SystemExit("bench.swiglu_micro needs a CUDA GPU with fp8 GEMM (compute capability 8.9+)")
    dev, g = torch.device("cuda"), torch.Generator().manual_seed(0)
    m = IMAGE_TOKENS + a.caption_tokens
    bf16 = [(torch.randn(n, k, generator=g) * 0.03).to(torch.bfloat16).to(dev)
            for n, k in ((HIDDEN, DIM), (HIDDEN, DIM), (DIM, HIDDEN))]
    fp8 = [Fp8Weights(*quantize_weight(w, "e4m3fn", "per_channel"), None) for w in bf16]
    x = (torch.randn(1, m, DIM, generator=g) * 2).to(torch.bfloat16).to(dev)
    checks = {}
    with torch.no_grad():
        gate, up = F.linear(x[0], bf16[0]), F.linear(x[0], bf16[1])
        a_k, s_k = launch_silu_mul_(gate.clone(), up)
        a_e, s_e = silu_mul_eager(gate, up)
        checks["kernel_codes_equal"] = bool(torch.equal(a_k.view(torch.uint8), a_e.view(torch.uint8)))
        checks["kernel_scales_equal"] = bool(torch.equal(s_k, s_e))
        checks["kernel_codes_differing"] = int((a_k.view(torch.uint8) != a_e.view(torch.uint8)).sum())
        scratch = gate.clone()   # the fused kernel writes the product over its first operand
        checks["fused_path_taken"] = fp8_swiglu_takes(x, *fp8)
        checks["fused_equals_unfused"] = bool(torch.equal(fp8_swiglu(x, *fp8), swiglu_unfused(x, *fp8)))
        rows = {
            "bf16": timed_ms(lambda: F.linear(F.silu(F.linear(x, bf16[0])) * F.linear(x, bf16[1]), bf16[2]), a.repeat),
            "fp8 layer by layer": timed_ms(lambda: swiglu_unfused(x, *fp8), a.repeat),
            "fp8 fused": timed_ms(lambda: fp8_swiglu(x, *fp8), a.repeat),
            "silu, product (PyTorch), quantize (Triton)": timed_ms(lambda: silu_mul_eager(gate, up), a.repeat),
            # the kernel writes over its first operand: each call gets a fresh copy (timed alone below)
            "silu, product, quantize (one Triton kernel) + copy": timed_ms(
                lambda: launch_silu_mul_(scratch.copy_(gate), up), a.repeat),
            "copy of gate alone": timed_ms(lambda: scratch.copy_(gate), a.repeat),
        }
    for name, r in rows.items():
        print(f"{name:42s} median {r['median_ms']:7.3f} ms  (x{FFNS_PER_CALL} per model call: "
              f"{r['median_ms'] * FFNS_PER_CALL:6.2f} ms)", flush=True)
    print("checks:", {k: v for k, v in checks.items()}, flush=True)
    env = {**host_environment(None), **device_environment(dev)}
    stamp = time.strftime("%Y-%m-%dT%H%M", time.gmtime())
    out = Path(a.out_dir) / f"swiglu_micro_{slug(env.get('device_name') or 'cuda')}_{stamp}.json"
    write_json(out, {"benchmark": "swiglu_micro", "finished": utc_now(), "environment": env,
                     "command": env.get("command"), "tokens": m, "dim": DIM, "hidden": HIDDEN,
                     "ffns_per_model_call": FFNS_PER_CALL, "checks": checks, "rows": rows})
    print(f"results: {out}")
    ok = all(checks[k] for k in ("kernel_codes_equal", "kernel_scales_equal", "fused_path_taken",
                                 "fused_equals_unfused"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
