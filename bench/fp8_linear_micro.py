"""Where the time of an fp8 Linear goes, on Flux-dev's own linear shapes at 1024x1024.

    python -m bench.fp8_linear_micro --out micro.json          # CUDA: every variant, Flux shapes
    python -m bench.fp8_linear_micro --smoke --out micro.json  # anywhere: tiny shapes, what runs there

For each shape (M tokens, K in, N out, calls per step) and variant (VARIANTS: bf16 matmul, the fp8 GEMM
alone with tensor-wise or row-wise scales, with or without fast accumulation, activation quantization
alone in several formulations, and the whole fp8 / dequant Linear of quant.matmul), the median of
--reps timed calls (CUDA events); then each variant's time per sampling step: sum of count x median.
Nothing here imports ComfyUI.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from quant import matmul as qm
from quant.scales import quantize_weight

from .results import device_environment, write_json
from .table import format_table

E4M3 = torch.float8_e4m3fn
# Flux-dev at 1024x1024: 4096 image tokens, 256 text tokens, 4352 in the single-stream blocks; hidden 3072,
# MLP 12288; 19 double blocks (image and text streams each: qkv, proj, mlp.0, mlp.2; two modulations
# of one vector each) and 38 single blocks (linear1 = qkv + mlp in, linear2 = proj + mlp out; one modulation).
FLUX_SHAPES = (  # (name, M, K, N, calls per step)
    ("img.qkv", 4096, 3072, 9216, 19), ("img.proj", 4096, 3072, 3072, 19),
    ("img.mlp0", 4096, 3072, 12288, 19), ("img.mlp2", 4096, 12288, 3072, 19),
    ("txt.qkv", 256, 3072, 9216, 19), ("txt.proj", 256, 3072, 3072, 19),
    ("txt.mlp0", 256, 3072, 12288, 19), ("txt.mlp2", 256, 12288, 3072, 19),
    ("single.linear1", 4352, 3072, 21504, 38), ("single.linear2", 4352, 15360, 3072, 38),
    ("double.mod", 1, 3072, 18432, 38), ("single.mod", 1, 3072, 9216, 38),
)
SMOKE_SHAPES = (("tiny.a", 64, 64, 96, 2), ("tiny.mod", 1, 64, 192, 2))


def _old_act_quant(x, act_scaling):
    """The formulation quant.matmul had first (six passes over x), kept here as the baseline."""
    amax = x.abs().amax(dim=1, keepdim=True).float() if act_scaling == "per_token" else x.abs().amax().float()
    scale = (amax / 448.0).clamp(min=torch.finfo(torch.float32).tiny)
    return (x.float() / scale).clamp_(-448.0, 448.0).to(E4M3).contiguous(), scale


class Operands:
    """One shape's inputs, made once: x [M, K] bf16, the weight in bf16 and per-channel fp8, a bias."""

    def __init__(self, m: int, k: int, n: int, device: torch.device, seed: int = 0):
        g = torch.Generator(device).manual_seed(seed)
        self.x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
        self.w = (torch.randn(n, k, device=device, generator=g) * 0.02).to(torch.bfloat16)
        self.bias = torch.randn(n, device=device, generator=g).to(torch.bfloat16) * 0.1
        self.w8, self.ws = quantize_weight(self.w, "e4m3fn", "per_channel")       # [N, K], [N]
        self.a_tok, self.sa_tok = qm.quantize_activation(self.x, "per_token")    # [M, K], [M, 1]
        self.ones = torch.ones((), device=device)
        self.sb_row = self.ws.reshape(1, -1).contiguous()                        # [1, N]


def _mm(o: Operands, rowwise: bool, fast: bool) -> torch.Tensor:
    sa, sb = (o.sa_tok, o.sb_row) if rowwise else (o.ones, o.ones)
    return torch._scaled_mm(o.a_tok, o.w8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                            use_fast_accum=fast)


def _compiled(act_scaling: str):
    fn = qm._compiled_quantize_activation()
    return lambda o: fn(o.x, act_scaling)


def _compiled_static():
    # One graph per (M, K): Inductor can fuse amax and cast into one kernel for a known row length.
    fn = torch.compile(qm.quantize_activation, dynamic=False)
    return lambda o: fn(o.x, "per_token")


def _triton():
    fn = qm.ACT_QUANTIZERS["triton"]()
    return lambda o: fn(o.x, "per_token")


def _with_options(fn: Callable[[Operands], object], **options) -> Callable[[Operands], object]:
    opts = qm.Fp8MatmulOptions(**options)

    def call(o: Operands):
        previous = qm.set_fp8_matmul_options(opts)
        try:
            return fn(o)
        finally:
            qm.set_fp8_matmul_options(previous)
    return call


def _linear_fp8(act_scaling: str, **options) -> Callable[[Operands], object]:
    fn = lambda o: qm.linear_fp8(o.x, o.w8, o.ws, o.bias, torch.bfloat16, act_scaling)  # noqa: E731
    return _with_options(fn, **options) if options else fn


# name -> (what, needs fp8 GEMM, factory of a callable on Operands); factories run once per shape.
VARIANTS: dict[str, tuple[str, bool, Callable[[], Callable[[Operands], object]]]] = {
    "bf16_linear": ("F.linear in bf16 (ComfyUI bf16)", False, lambda: lambda o: F.linear(o.x, o.w, o.bias)),
    "gemm_tensorwise": ("_scaled_mm alone, tensor-wise scales (ComfyUI --fast's GEMM)", True,
                        lambda: lambda o: _mm(o, False, False)),
    "gemm_tensorwise_fast": ("same, use_fast_accum", True, lambda: lambda o: _mm(o, False, True)),
    "gemm_rowwise": ("_scaled_mm alone, row-wise scales (ours)", True, lambda: lambda o: _mm(o, True, False)),
    "gemm_rowwise_fast": ("same, use_fast_accum", True, lambda: lambda o: _mm(o, True, True)),
    "aq_old_token": ("activation quant, first formulation (6 passes), per token", False,
                     lambda: lambda o: _old_act_quant(o.x, "per_token")),
    "aq_token": ("activation quant, quant.matmul (3 passes), per token", False,
                 lambda: lambda o: qm.quantize_activation(o.x, "per_token")),
    "aq_tensor": ("activation quant, quant.matmul, per tensor", False,
                  lambda: lambda o: qm.quantize_activation(o.x, "per_tensor")),
    "aq_compiled_token": ("activation quant, torch.compile, per token", False, lambda: _compiled("per_token")),
    "aq_compiled_tensor": ("activation quant, torch.compile, per tensor", False, lambda: _compiled("per_tensor")),
    "aq_compiled_static_token": ("activation quant, torch.compile one graph per shape, per token", False,
                                 _compiled_static),
    "aq_triton_token": ("activation quant, one Triton kernel (quant.act_quant_triton), per token", False, _triton),
    "aq_comfy_clamp_cast": ("clamp + cast, scale 1 (ComfyUI --fast's activations)", False,
                            lambda: lambda o: torch.clamp(o.x, -448, 448).to(E4M3)),
    "linear_fp8_token": ("quant.matmul fp8 Linear, per token (ours)", True, lambda: _linear_fp8("per_token")),
    "linear_fp8_tensor": ("quant.matmul fp8 Linear, per tensor", True, lambda: _linear_fp8("per_tensor")),
    "linear_fp8_token_fast": ("same as linear_fp8_token, use_fast_accum", True,
                              lambda: _linear_fp8("per_token", fast_accum=True)),
    "linear_fp8_token_triton": ("linear_fp8_token with the Triton activation quant", True,
                                lambda: _linear_fp8("per_token", act_quant="triton")),
    "linear_fp8_token_triton_fast": ("same, use_fast_accum", True,
                                     lambda: _linear_fp8("per_token", act_quant="triton", fast_accum=True)),
    "dq_eager": ("weight dequant alone, two PyTorch kernels", False,
                 lambda: lambda o: qm.DEQUANTIZERS["eager"]()(o.w8, o.ws, torch.bfloat16)),
    "dq_triton": ("weight dequant alone, one Triton kernel (quant.dequant_triton)", False,
                  lambda: lambda o: qm.DEQUANTIZERS["triton"]()(o.w8, o.ws, torch.bfloat16)),
    "linear_dequant": ("quant.matmul dequant Linear (bf16 matmul), default dequantizer", False,
                       lambda: lambda o: qm.linear_dequant(o.x, o.w8, o.ws, o.bias, torch.bfloat16)),
    "linear_dequant_eager": ("same with the two-kernel PyTorch dequantizer", False,
                             lambda: _with_options(lambda o: qm.linear_dequant(o.x, o.w8, o.ws, o.bias, torch.bfloat16),
                                                   dequant="eager")),
}
COMPILED = ("aq_compiled_token", "aq_compiled_tensor", "aq_compiled_static_token")
NEEDS_CUDA = ("aq_triton_token", "linear_fp8_token_triton", "linear_fp8_token_triton_fast", "dq_triton")


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median seconds of one call: CUDA events around each call on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(shapes, variants: list[str], device: torch.device, warmup: int, reps: int) -> list[dict]:
    fp8 = qm.fp8_matmul_supported(device)
    rows = []
    for name, m, k, n, count in shapes:
        o = Operands(m, k, n, device)
        for v in variants:
            what, needs_fp8, factory = VARIANTS[v]
            row = {"shape": name, "m": m, "k": k, "n": n, "count": count, "variant": v}
            if (needs_fp8 and not fp8) or (v in NEEDS_CUDA and device.type != "cuda"):
                row["error"] = f"no fp8 matmul on {device}" if needs_fp8 else f"needs CUDA, not {device}"
                rows.append(row)
                continue
            try:
                fn = factory()
                t0 = time.perf_counter()
                fn(o)   # first call: compiles what compiles
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row["first_call_s"] = time.perf_counter() - t0
                row["median_s"] = time_call(functools.partial(fn, o), device, warmup, reps)
                if v.startswith("aq_") and v != "aq_comfy_clamp_cast":
                    # Bytes that differ from quant.matmul.quantize_activation (fused kernels may round a tie apart).
                    a = fn(o)[0]
                    row["bytes_differ_from_eager"] = float((a.view(torch.uint8) != o.a_tok.view(torch.uint8))
                                                           .float().mean()) if v.endswith("token") else None
                if v.startswith("dq_"):
                    # Bytes that differ from w8 * scale computed in fp32 and rounded once to bf16.
                    exact = (o.w8.float() * o.ws.reshape(-1, 1)).to(torch.bfloat16)
                    row["bytes_differ_from_fp32_rounded"] = float((fn(o).view(torch.int16) != exact.view(torch.int16))
                                                                  .float().mean())
                row["tflops"] = 2 * m * k * n / row["median_s"] / 1e12 if v.startswith(("gemm", "linear", "bf16")) else None
            except Exception as e:  # a variant the build cannot run (no compiler, no kernel) is recorded, not fatal
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append(row)
        del o
    return rows


def per_step(rows: list[dict], variants: list[str]) -> dict[str, float | None]:
    """Seconds per sampling step each variant would spend in Flux's linear layers (None: a shape failed)."""
    out = {}
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        out[v] = None if any("median_s" not in r for r in mine) else sum(r["count"] * r["median_s"] for r in mine)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fp8_linear_micro", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, on the CPU unless CUDA is there")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v and not (a.no_compile and v in COMPILED)]
    if unknown := [v for v in variants if v not in VARIANTS]:
        ap.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    shapes = SMOKE_SHAPES if a.smoke else FLUX_SHAPES
    t0 = time.perf_counter()
    with torch.inference_mode():
        rows = run(shapes, variants, device, a.warmup, a.reps)
    steps = per_step(rows, variants)
    flops = sum(2 * m * k * n * c for _, m, k, n, c in shapes)
    write_json(Path(a.out), {"benchmark": "fp8_linear_micro", "smoke": a.smoke, "environment": device_environment(device),
                             "shapes": [dict(zip(("name", "m", "k", "n", "count"), s)) for s in shapes],
                             "linear_flop_per_step": flops, "variants": {v: VARIANTS[v][0] for v in variants},
                             "per_step_s": steps, "rows": rows, "seconds": time.perf_counter() - t0})
    print(format_table(["variant", "s per step (Flux linears)", "what"],
                       [[v, steps[v], VARIANTS[v][0]] for v in variants], digits=4))
    errors = [f"{r['shape']}/{r['variant']}: {r['error']}" for r in rows if "error" in r]
    for e in errors[:8]:
        print("micro error: " + e)
    print(json.dumps({"micro_per_step_s": steps}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
