"""Replay a model call captured in a CUDA graph, one graph per signature of the call's inputs (plain PyTorch).

Why: at one image per model call (NewBie's cond and uncond captions differ in length, so ComfyUI never batches
them) an eager fp8 DiT call is bound by the host: Python issues its ~2000 kernels barely ahead of the GPU, and
any slowdown of the host shows in the step time (bench/results/workflows_e2e_*T1050..T1438: steps of 0.116 s
between bursts of 0.19-0.30 s). A replayed graph issues the whole call in one launch, with the eager call's bits
(bench/results/newbie_dit_fidelity_nvidia-h200_2026-11-22T1118.json: 63.42 ms replayed against 68.09 ms eager).

How one signature (shapes, strides, dtypes and devices of every tensor in args/kwargs, and the values of the
rest) goes:
  1st call  probe: eager, on the capture stream (per-stream state such as cuBLAS workspaces is made here, not
            inside the capture), with torch's sync debug mode set to "error": an operation that would wait for
            the GPU (.item(), a pageable copy) cannot be captured, and raising here, before any capture, is
            safe. Such a signature is refused and runs eager from then on.
  2nd call  capture: the tensors are copied into static inputs, the call is captured, its outputs are copied
            (inside the graph) into static outputs allocated before the capture, so no allocation made during
            the capture outlives it; then the graph is replayed once.
  later     replay: copy the new inputs into the static ones, replay, return clones of the static outputs
            (the caller may hold one output while the next call replays the same graph).

A failed capture must not take the process down: under cudaMallocAsync, freeing a tensor allocated during a
capture after its graph is gone aborts the process (gpu_rounds_nvidia-h200_2026-11-22T1118.log). So a failed
capture's graph and exception (whose frames hold those tensors) are kept for the life of the process (they
were never launched: no physical memory behind them), graphs are turned off for this GraphedCalls, and the call
runs eager. The owner drops every graph (clear) when the weights may move: after a sampling, on re-plans, on
unload; the graphs hold the weights' addresses, not references to them.

One hazard no code here can prevent: a tensor allocated during a capture must not be freed by another thread
while the capture runs. Only something holding the capturing thread's frames does that (an in-process sampling
profiler that kept the last frame across its sleep aborted the server so: bench/results/
workflows_e2e_nvidia-h200_2026-11-22T1717.json; bench.stack_sampler now drops it at once).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

log = logging.getLogger("lowvram")

# torch's message when an operation synchronizes under set_sync_debug_mode("error")
SYNC_ERROR_TEXT = "synchronizing CUDA operation"
DEFAULT_MAX_GRAPHS = 4   # signatures per owner between clears: cond and uncond, with room for a second size
# Failed captures' graphs and exceptions, kept until the process ends (see the module docstring).
_BURIED: list = []
_PRIMITIVES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)
SLOT = object()   # where an output tensor sits in a captured call's output tree


class CaptureRefused(Exception):
    """A call that cannot run as a graph; the reason is the message."""


# ---- inputs --------------------------------------------------------------------------------------------
def tensor_leaves(tree, device: torch.device, out: list, keep: list) -> tuple:
    """Collect the tensors on `device` of a tree of dicts, lists and tuples into `out` (they become the graph's
    static inputs) and the other non-value leaves into `keep`; return a hashable key of everything but the
    values of the tensors in `out`.

    A tensor elsewhere (ComfyUI's sample_sigmas on the host, say) is keyed by identity and version: the model
    may read it only on the host, which the capture would bake in, so a new object or an in-place change
    makes a new signature (and an upload of it inside the call is a synchronizing copy, refused at the probe)."""
    if isinstance(tree, torch.Tensor):
        if tree.device == device:
            out.append(tree)
            return ("T", tuple(tree.shape), tuple(tree.stride()), tree.dtype)
        keep.append(tree)
        return ("H", id(tree), tree._version)
    if isinstance(tree, dict):
        return ("d", tuple((k, tensor_leaves(v, device, out, keep)) for k, v in tree.items()))
    if isinstance(tree, (list, tuple)):
        return ("l" if isinstance(tree, list) else "t", tuple(tensor_leaves(v, device, out, keep) for v in tree))
    if isinstance(tree, _PRIMITIVES):
        return ("v", tree)
    keep.append(tree)   # a function, a module, an option object: the same object, not an equal one
    return ("o", id(tree))


def with_tensors(tree, device: torch.device, tensors):
    """A copy of the tree's containers whose tensors on `device` (and SLOT markers) are replaced, in order, by
    the iterator's; other leaves stay the same objects."""
    if tree is SLOT or (isinstance(tree, torch.Tensor) and tree.device == device):
        return next(tensors)
    if isinstance(tree, dict):
        return {k: with_tensors(v, device, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [with_tensors(v, device, tensors) for v in tree]
    if isinstance(tree, tuple):
        items = [with_tensors(v, device, tensors) for v in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)   # a namedtuple, or a tuple
    return tree


def refusal(tensors: list[torch.Tensor]) -> str | None:
    """Why a call with these static inputs cannot be replayed from a graph (None: it can)."""
    if any(t.requires_grad for t in tensors):
        return "an input tensor requires grad"
    return None


# ---- the CUDA side (a fake one runs the same logic on the CPU in tests) -------------------------------
class CudaGraphBackend:
    """Captures and replays with torch.cuda; one side stream per device for probes and captures."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = None   # the memory pool the graphs of one round share (native allocator), made at a capture

    def new_round(self) -> None:
        """The graphs were dropped: the next capture takes a new pool. The allocator forgets a pool once its
        last graph is gone, and a capture into a forgotten pool fails an internal assert (the repeat prompt of
        bench/results/workflows_e2e_nvidia-h200_2026-11-22T1657.json)."""
        self.pool = None

    @contextlib.contextmanager
    def on_side_stream(self, outputs: Callable[[], list]):
        """Run the body on the side stream, ordered after the work queued so far and before what comes next;
        the tensors `outputs()` lists are used on the current stream afterwards (record_stream)."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            current.wait_stream(self.stream)
        for t in outputs():
            t.record_stream(current)

    @contextlib.contextmanager
    def sync_errors(self):
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(before)

    def capture(self, body: Callable[[], None]):
        """A graph of body(), captured on the side stream; raises what body or the capture raised, after
        burying whatever the failed capture allocated."""
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    body()
                except BaseException as e:
                    _bury(graph, e)
                    with contextlib.suppress(Exception):
                        graph.capture_end()
                    raise
                try:
                    graph.capture_end()
                except BaseException as e:
                    _bury(graph, e)
                    raise
        finally:
            current.wait_stream(self.stream)
        # The eager calls' activations sit in the allocator's cache while the graph holds memory of its own for
        # the same work: give the cache back (0.32 GiB more at NewBie's 6 GiB peak without this, T1657).
        torch.cuda.empty_cache()
        return graph


def _bury(graph, error: BaseException) -> None:
    kept = (graph, error, error.__traceback__)
    _BURIED.append(kept)
    # Not even the interpreter's exit may free these: it would free the graph before the tensors and abort
    # (bench.cuda_graph_check under cudaMallocAsync, gpu_rounds_nvidia-h200_2026-11-22T1657.log).
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(kept))


def release_graph_memory(device) -> None:
    """After the graphs are dropped: give the device memory they held back. cudaMallocAsync keeps graph
    allocations in the device's graph memory pool, outside torch's, until cuDeviceGraphMemTrim; the native
    allocator's private pools go back with empty_cache."""
    device = torch.device(device)
    torch.cuda.synchronize(device)
    # cuBLAS keeps a workspace per stream: the side stream's (made by the probes) would stay allocated, and the
    # VAE decode after a sampling saw 40 MB less free and tiled differently than without graphs (T1723).
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:
        clear_workspaces()
    torch.cuda.empty_cache()
    driver = _cuda_driver()
    if driver is None:
        return
    handle = ctypes.c_int()
    if driver.cuDeviceGet(ctypes.byref(handle), device.index or 0) == 0:
        driver.cuDeviceGraphMemTrim(handle)


@functools.lru_cache(maxsize=1)
def _cuda_driver():
    try:
        return ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return None


# ---- the owner's object ------------------------------------------------------------------------------
@dataclass
class Captured:
    graph: Any
    inputs: list[torch.Tensor]     # static copies of the call's tensors, in tensor_leaves order
    outputs: list[torch.Tensor]    # static outputs, allocated before the capture
    output_tree: Any               # the call's output, whose tensors the clones of `outputs` replace
    keep: list                     # the non-value leaves the key names by id: kept alive so ids stay unique


@dataclass
class GraphStats:
    probed: int = 0
    captured: int = 0
    replays: int = 0
    refused: dict[str, int] = field(default_factory=dict)   # reason -> calls run eager for it

    def refuse(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1


@dataclass
class _Probed:
    output_meta: list[tuple]   # (shape, stride, dtype) per output tensor


class GraphedCalls:
    """Runs fn(*args, **kwargs) through per-signature CUDA graphs (see the module docstring)."""

    def __init__(self, device, backend=None, max_graphs: int = DEFAULT_MAX_GRAPHS):
        self.device = torch.device(device)
        self.backend = backend if backend is not None else CudaGraphBackend(self.device)
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, Captured] = {}
        self.probed: dict[tuple, _Probed] = {}
        self.refused: dict[tuple, str] = {}
        self.disabled: str | None = None   # why graphs are off for good (a capture failed)
        self.stats = GraphStats()

    def clear(self) -> None:
        """Drop every graph (the weights they read may move next). Signatures stay probed or refused."""
        self.graphs.clear()
        self.backend.new_round()

    def forget(self) -> None:
        """Drop the graphs, what the probes learned and the counts (the owner's sampling ended: its keys name
        objects by id, which a later sampling's objects may reuse). A failed capture keeps graphs off."""
        self.clear()
        self.probed.clear()
        self.refused.clear()
        self.stats = GraphStats()

    def __call__(self, fn: Callable, *args, **kwargs):
        tensors, keep = [], []
        key = tensor_leaves((args, kwargs), self.device, tensors, keep)
        captured = self.graphs.get(key)
        if captured is not None:
            return self._replay(captured, tensors)
        why = self.disabled or self.refused.get(key) or refusal(tensors)
        if why is None and key not in self.probed:
            return self._probe(key, fn, args, kwargs)
        if why is None and len(self.graphs) >= self.max_graphs:
            why = f"more than {self.max_graphs} input signatures between two clears"
        if why is not None:
            self.stats.refuse(why)
            return fn(*args, **kwargs)
        try:
            return self._capture(key, keep, tensors, fn, args, kwargs)
        except CaptureRefused as e:
            self.refused[key] = str(e)
        except Exception as e:   # noqa: BLE001 - any failed capture: graphs off, this call eager
            self.disabled = f"a capture failed ({type(e).__name__}: {e})"
            log.warning("LowVRAM Kit: CUDA graphs turned off for this model: %s; calls run eager", self.disabled)
        self.stats.refuse(self.refused.get(key) or self.disabled)
        return fn(*args, **kwargs)

    def _probe(self, key, fn, args, kwargs):
        self.stats.probed += 1
        outputs: list[torch.Tensor] = []
        try:
            with self.backend.on_side_stream(lambda: outputs), self.backend.sync_errors():
                out = fn(*args, **kwargs)
                tensor_leaves(out, self.device, outputs, [])
        except RuntimeError as e:
            if SYNC_ERROR_TEXT not in str(e):
                raise
            self.refused[key] = "the call waits for the GPU (a synchronizing operation), which a graph cannot hold"
            self.stats.refuse(self.refused[key])
            return fn(*args, **kwargs)
        self.probed[key] = _Probed([(tuple(t.shape), tuple(t.stride()), t.dtype) for t in outputs])
        return out

    def _capture(self, key, keep, tensors, fn, args, kwargs):
        inputs = [t.detach().clone() for t in tensors]
        s_args, s_kwargs = with_tensors((args, kwargs), self.device, iter(inputs))
        meta = self.probed[key].output_meta
        outputs = [torch.empty_strided(shape, stride, dtype=dtype, device=self.device) for shape, stride, dtype in meta]
        tree: list = []

        def body():
            out = fn(*s_args, **s_kwargs)
            got: list[torch.Tensor] = []
            tensor_leaves(out, self.device, got, [])
            if [(tuple(t.shape), tuple(t.stride()), t.dtype) for t in got] != meta:
                raise CaptureRefused("the call's outputs changed shape between two calls with the same inputs")
            for static, t in zip(outputs, got):
                static.copy_(t)
            tree.append(with_tensors(out, self.device, iter([SLOT] * len(got))))

        graph = self.backend.capture(body)
        captured = self.graphs[key] = Captured(graph, inputs, outputs, tree[0], keep)
        self.stats.captured += 1
        return self._replay(captured, tensors)

    def _replay(self, captured: Captured, tensors: list[torch.Tensor]):
        for static, t in zip(captured.inputs, tensors):
            if static is not t:
                static.copy_(t)
        captured.graph.replay()
        self.stats.replays += 1
        return with_tensors(captured.output_tree, self.device, iter([t.clone() for t in captured.outputs]))
