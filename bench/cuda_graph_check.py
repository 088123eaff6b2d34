"""Check CUDA graphs of fp8 calls that launch our Triton kernels, under the allocator backend this process runs.

    python -m bench.cuda_graph_check        # PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync for ComfyUI's default

Replays must equal eager bit for bit (fused SwiGLU, per-token quantizer, weight dequantizer), also in a second
round after the graphs were dropped; a call that syncs
must be refused at its probe; a capture that fails after allocating must turn graphs off and leave the process
alive (under cudaMallocAsync a failed capture used to abort it: gpu_rounds_nvidia-h200_2026-11-22T1118.log).
Prints "OK <backend>" and exits 0, or fails an assertion. tests/unit/test_cuda_graphs_gpu.py runs it per backend.
"""
from __future__ import annotations

import torch

from offload.cuda_graphs import GraphedCalls
from quant import quantize_weight
from quant.matmul import fp8_linear
from quant.swiglu import Fp8Weights, fp8_swiglu


def main() -> None:
    g = torch.Generator().manual_seed(3)

    def proj(n, k):
        w, s = quantize_weight(torch.randn(n, k, generator=g) * 0.05, "e4m3fn", "per_channel")
        return Fp8Weights(w.cuda(), s.cuda(), None)

    gate, up, down, out = proj(1024, 256), proj(1024, 256), proj(256, 1024), proj(128, 256)

    def call(x, options):
        h = fp8_swiglu(x, gate, up, down)                             # Triton: fused silu-mul-quantize
        y = fp8_linear(h, out.weight, out.scale, mode="fp8")          # Triton: per-token quantizer
        z = fp8_linear(h, out.weight, out.scale, mode="dequant")      # Triton: weight dequantizer
        return {"y": y * options["sigmas"], "z": z}

    xs = [(torch.randn(300, 256, generator=g) * 2).to(torch.bfloat16).cuda() for _ in range(4)]
    opts = [{"sigmas": torch.full((1,), 0.5 + k, device="cuda"), "cond_or_uncond": [0]} for k in range(4)]
    with torch.inference_mode():
        eager = [call(x, o) for x, o in zip(xs, opts)]
        graphs = GraphedCalls(xs[0].device)
        got = [graphs(call, x, o) for x, o in zip(xs, opts)]
        torch.cuda.synchronize()
        assert graphs.stats.captured == 1 and graphs.stats.replays == 3, graphs.stats
        for e, r in zip(eager, got):
            assert torch.equal(e["y"], r["y"]) and torch.equal(e["z"], r["z"])
        # A second round after the graphs were dropped (the next sampling): a new pool, the same bits.
        graphs.forget()
        again = [graphs(call, x, o) for x, o in zip(xs, opts)]
        assert graphs.stats.captured == 1 and graphs.stats.replays == 3, graphs.stats
        assert all(torch.equal(e["y"], r["y"]) for e, r in zip(eager, again))

        # A call that syncs (.item()) is refused at its probe, before any capture.
        syncs = GraphedCalls(xs[0].device)
        for x in xs[:3]:
            syncs(lambda x: x * x.float().abs().max().item(), x)
        assert syncs.stats.captured == 0 and len(syncs.stats.refused) == 1, syncs.stats

        # A capture that fails after allocating: graphs off, the call eager, the process alive.
        def flaky(x):
            y = x * 2
            if torch.cuda.is_current_stream_capturing():
                raise ValueError("fails inside the capture")
            return y
        failing = GraphedCalls(xs[0].device)
        outs = [failing(flaky, x) for x in xs]
        assert failing.disabled and all(torch.equal(o, x * 2) for o, x in zip(outs, xs))
        graphs.forget()
        del graphs, got, outs
        torch.cuda.synchronize()
    print("OK", torch.cuda.get_allocator_backend())


if __name__ == "__main__":
    main()
