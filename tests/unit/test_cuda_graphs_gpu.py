"""CUDA graphs of fp8 calls with our Triton kernels, on a GPU, under both of PyTorch's allocator backends
(bench.cuda_graph_check, which the GPU rounds also run where pytest is not installed).

ComfyUI starts PyTorch with cudaMallocAsync; there, Triton refused tensors allocated during a capture and the
process aborted when the failed capture's tensors were freed (bench/results/gpu_rounds_nvidia-h200_2026-11-22T1118
.log). Each case runs in a fresh interpreter (the backend is chosen when CUDA starts) and must exit cleanly:
replays equal to eager bit for bit, a call that syncs refused at its probe, a capture that fails turning graphs
off without taking the process down.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quant.matmul as mm

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not mm.fp8_matmul_supported("cuda"),
                    reason="needs a GPU with fp8 GEMM (compute capability 8.9+)")
@pytest.mark.parametrize("backend", ["native", "cudaMallocAsync"])
def test_fp8_calls_replay_bit_for_bit_and_failures_stay_safe(backend):
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": f"backend:{backend}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "bench.cuda_graph_check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert f"OK {backend}" in done.stdout
