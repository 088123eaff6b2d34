"""Issue #3's dequant path: how fast each Triton tile turns a Flux step's fp8 weights into bf16, host excluded.

    python -m bench.dequant_sweep --out $OUT/dequant_sweep.json     # CUDA (about a minute on an H200)

Every variant dequantizes all 304 quantized weights of Flux-dev once (one sampling step's worth, each weight
its own tensor: 11.9 GB of fp8, nothing served from L2), captured in one CUDA graph and replayed, so the
figure is GPU time, as inside a step where the GEMMs keep the GPU busy while Python launches ahead (the
event-timed calls of bench.fp8_linear_micro carry each launch's ~30 us instead). Variants: the kernel this
pack shipped before (decoding with integer arithmetic, one 1024-column strip of one row per program),
PyTorch's two kernels, and quant.dequant_triton at every DequantTile of --tiles. Then the whole Linear,
dequant + bf16 matmul, with the shipped tile and the fastest one against bf16 F.linear, also as graphs:
what the dequant path should cost a step. Nothing here imports ComfyUI.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from quant.matmul import dequantize_weight_eager

from .fp8_linear_micro import FLUX_SHAPES
from .results import device_environment, host_environment, write_json
from .table import format_table

DEFAULT_TILES = "rows=1,2,4,8;block_k=512,1024,2048,4096;warps=4,8"


def parse_tiles(spec: str) -> list[tuple[int, int, int]]:
    """ "rows=1,2;block_k=1024;warps=4" -> every (rows, block_k, warps) combination, in that order."""
    fields = {}
    for part in spec.split(";"):
        name, _, values = part.partition("=")
        fields[name.strip()] = [int(v) for v in values.split(",") if v.strip()]
    missing = [f for f in ("rows", "block_k", "warps") if not fields.get(f)]
    if missing:
        raise ValueError(f"--tiles {spec!r} names no value for {', '.join(missing)}; e.g. {DEFAULT_TILES!r}")
    return list(itertools.product(fields["rows"], fields["block_k"], fields["warps"]))


def step_bytes(shapes=FLUX_SHAPES) -> int:
    """Bytes a step's dequant moves: 1 read + 2 written per weight."""
    return sum(3 * k * n * count for _, _, k, n, count in shapes)


def graph_seconds(launches: list[Callable[[], object]], reps: int) -> float:
    """Median seconds of one replay of a CUDA graph holding every launch (run once eagerly first to compile)."""
    for f in launches:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in launches:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    torch.cuda.synchronize()
    return statistics.median(times)


try:   # Triton comes with CUDA builds of torch; the CPU tests import this module for its pure parts only
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _previous_kernel(w_ptr, s_ptr, out_ptr, K, BLOCK_K: tl.constexpr):
        # As quant/dequant_triton.py had it until commit e91c649 (e4m3fn only here): one row strip per program,
        # the fp8 bits decoded into fp32 bits with integer arithmetic, subnormals by a multiply.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = cols < K
        offs = row * K + cols
        b = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.int32)
        sign, exp, mant = (b >> 7) & 1, (b >> 3) & 15, b & 7             # e4m3fn: exponent bias 7
        normal = ((sign << 31) | ((exp + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)
        sub = mant.to(tl.float32) * 0.001953125                          # 2^-9
        sub = tl.where(sign == 1, -sub, sub)
        w = tl.where(exp == 0, sub, normal)
        tl.store(out_ptr + offs, (w * tl.load(s_ptr + row)).to(out_ptr.dtype.element_ty), mask=mask)


def previous_dequant(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The previous kernel's launch: w8 [N, K] e4m3fn, scale [N] fp32 -> [N, K] `dtype`."""
    out = torch.empty(w8.shape, dtype=dtype, device=w8.device)
    _previous_kernel[(w8.shape[0], triton.cdiv(w8.shape[1], 1024))](w8.view(torch.uint8), scale, out, w8.shape[1],
                                                                    BLOCK_K=1024, num_warps=4)
    return out


class StepWeights:
    """Flux-dev's quantized weights for one step: per call of each shape its own fp8 [N, K] and fp32 [N] scale."""

    def __init__(self, device: torch.device, shapes=FLUX_SHAPES):
        g = torch.Generator(device).manual_seed(0)
        self.layers = []   # (shape name, M, fp8 weight, scale)
        for name, m, k, n, count in shapes:
            for _ in range(count):
                w = torch.randn(n, k, device=device, generator=g).mul_(0.02)
                scale = w.abs().amax(dim=1).div_(448.0)
                self.layers.append((name, m, (w / scale[:, None]).to(torch.float8_e4m3fn), scale))
                del w
        self.inputs_by_shape = {name: torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
                                for name, m, k, _, _ in shapes}   # x [M, K] per shape


def dequant_launches(weights: StepWeights, dequantize) -> list[Callable[[], object]]:
    return [lambda w=w, s=s: dequantize(w, s, torch.bfloat16) for _, _, w, s in weights.layers]


def linear_launches(weights: StepWeights, dequantize) -> list[Callable[[], object]]:
    return [lambda name=name, w=w, s=s: F.linear(weights.inputs_by_shape[name], dequantize(w, s, torch.bfloat16))
            for name, _, w, s in weights.layers]


def run(reps: int, tiles: list[tuple[int, int, int]]) -> dict:
    from quant import dequant_triton as dt

    device = torch.device("cuda")
    weights = StepWeights(device)
    moved = step_bytes()
    rows = []

    def record(variant: str, what: str, launches, tile=None) -> dict:
        try:
            seconds = graph_seconds(launches, reps)
            row = {"variant": variant, "what": what, "tile": tile, "step_s": seconds, "tb_per_s": moved / seconds / 1e12}
        except Exception as e:   # a tile the compiler rejects is a row with its error, not the end of the run
            row = {"variant": variant, "what": what, "tile": tile, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append(row)
        print(f"[sweep] {variant}: {row.get('step_s', row.get('error'))}", flush=True)
        return row

    record("previous", "shipped until e91c649: integer decode, one 1024-column strip per program",
           dequant_launches(weights, previous_dequant))
    record("eager", "two PyTorch kernels (cast, then multiply)", dequant_launches(weights, dequantize_weight_eager))
    for rows_, block_k, warps in tiles:
        tile = dt.DequantTile(rows_, block_k, warps)
        record(f"tile r{rows_} k{block_k} w{warps}", "quant.dequant_triton", dequant_launches(
            weights, lambda w, s, d, tile=tile: dt.launch_dequant(w, s, d, tile)), tile=[rows_, block_k, warps])
    timed = [r for r in rows if r["variant"].startswith("tile") and "step_s" in r]
    best = min(timed, key=lambda r: r["step_s"]) if timed else None
    shipped = dt.DEFAULT_TILE
    best_tile = dt.DequantTile(*best["tile"]) if best else shipped

    linear = []
    bf16 = [(name, w.to(torch.bfloat16) * s[:, None].to(torch.bfloat16)) for name, _, w, s in weights.layers]
    for variant, launches in (
        ("bf16_linear", [lambda name=name, w=w: F.linear(weights.inputs_by_shape[name], w) for name, w in bf16]),
        ("dequant_linear_previous", linear_launches(weights, previous_dequant)),
        ("dequant_linear_shipped", linear_launches(weights, lambda w, s, d: dt.launch_dequant(w, s, d, shipped))),
        ("dequant_linear_best", linear_launches(weights, lambda w, s, d: dt.launch_dequant(w, s, d, best_tile))),
    ):
        try:
            linear.append({"variant": variant, "step_s": graph_seconds(launches, reps)})
        except Exception as e:
            linear.append({"variant": variant, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(f"[sweep] {linear[-1]}", flush=True)
    del bf16
    return {"rows": rows, "linear": linear, "bytes_per_step": moved, "shipped_tile": list(vars(shipped).values()),
            "best_tile": best and best["tile"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tiles", default=DEFAULT_TILES, help="rows=..;block_k=..;warps=.. (every combination)")
    a = ap.parse_args(argv)
    tiles = parse_tiles(a.tiles)
    if not torch.cuda.is_available():
        print("[sweep] needs a CUDA GPU (CUDA graphs and Triton)", file=sys.stderr)
        return 2
    result = run(a.reps, tiles)
    env = {**host_environment(None), **device_environment(torch.device("cuda"))}
    payload = {"benchmark": "dequant_sweep", "environment": env,
               "shapes": [list(s) for s in FLUX_SHAPES], **result}
    write_json(Path(a.out), payload)
    print(format_table(["variant", "tile", "step ms", "TB/s"],
                       [[r["variant"], r.get("tile"), r.get("step_s") and r["step_s"] * 1e3, r.get("tb_per_s")]
                        for r in result["rows"]]))
    print(format_table(["linear", "step ms"], [[r["variant"], r.get("step_s") and r["step_s"] * 1e3]
                                                for r in result["linear"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
