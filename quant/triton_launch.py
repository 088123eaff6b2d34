"""Launch a Triton kernel so that the launch can also be captured in a CUDA graph under cudaMallocAsync.

Why this exists: Triton's launcher checks every tensor argument with cuPointerGetAttribute before it
launches. Under ComfyUI's default allocator backend (cudaMallocAsync), a tensor allocated while a stream
is being captured is a graph allocation that is mapped only when the graph runs, so that check fails
("Pointer argument cannot be accessed from Triton") and the capture is lost
(bench/results/gpu_rounds_nvidia-h200_2026-11-22T1118.log). The launcher takes plain integers for pointer
arguments without that check. So, while the current stream captures, `launch` compiles or finds the kernel
exactly as a normal launch would (same specialization: dtypes, 16-byte alignment, integer divisibility) and
hands the launcher each tensor's address instead of the tensor. Outside a capture it is `kernel[grid](...)`.

The swap touches only the CompiledKernel object Triton keeps for our own kernel, for the duration of one
launch, on the thread that captures. Where the launcher lives on that object differs between Triton
versions (`run`, or `_run` behind a `run` property since about 3.4); `capturable()` says whether this
Triton is one of the two, and graph capture is not attempted where it is not (offload.cuda_graphs asks).
"""
from __future__ import annotations

import functools

import torch


def capturing(first_arg) -> bool:
    """Whether a launch whose first argument is `first_arg` (a tensor in every kernel of ours) is being
    captured. Asked of CUDA tensors only: the CPU interpreter (tests) must not start CUDA."""
    return isinstance(first_arg, torch.Tensor) and first_arg.is_cuda and torch.cuda.is_current_stream_capturing()


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, also valid while the current CUDA stream is being captured."""
    if not capturing(args[0] if args else None):
        return kernel[grid](*args, **kwargs)
    compiled = kernel.warmup(*args, grid=grid, **kwargs)   # no launch; the eager warm-up call compiled it
    slot = launcher_slot(compiled)
    if slot is None:
        raise RuntimeError("this Triton keeps its kernel launcher where LowVRAM Kit does not look for it, so a "
                           "Triton kernel cannot be captured in a CUDA graph here; turn cuda_graphs off")
    real = getattr(compiled, slot)
    setattr(compiled, slot, functools.partial(_by_address, real))
    try:
        return kernel[grid](*args, **kwargs)
    finally:
        setattr(compiled, slot, real)


def _by_address(real_launcher, *launch_args):
    # launch_args: grid x3, stream, function, metadata, hooks, then the kernel's own arguments; only the
    # kernel's pointer arguments are tensors.
    return real_launcher(*[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in launch_args])


def launcher_slot(compiled) -> str | None:
    """The attribute of a Triton CompiledKernel that holds its launcher, initialised; None if unknown."""
    init = getattr(compiled, "_init_handles", None)
    if init is None:
        return None
    init()
    if isinstance(getattr(type(compiled), "run", None), property):
        return "_run" if callable(getattr(compiled, "_run", None)) else None
    return "run" if callable(getattr(compiled, "run", None)) else None


@functools.lru_cache(maxsize=1)
def capturable() -> bool:
    """Whether this Triton's JIT and CompiledKernel have the parts `launch` uses during a capture."""
    try:
        import triton  # noqa: F401
        from triton.compiler.compiler import CompiledKernel
        from triton.runtime.jit import JITFunction
    except Exception:
        return False
    return hasattr(JITFunction, "warmup") and hasattr(CompiledKernel, "_init_handles")
