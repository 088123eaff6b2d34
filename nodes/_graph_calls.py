"""ChunkedOffloadUNet's CUDA graphs: a model call replayed from a graph while every block is resident.

A DIFFUSION_MODEL wrapper (ComfyUI's own wrapper mechanism, on the node's clone) runs each call of the
diffusion model through offload.cuda_graphs.GraphedCalls when nothing would change between the capture and a
replay except the input tensors' values; otherwise the call runs eager and the reason is counted. The graphs
live for one sampling: they are dropped when it ends (their memory given back before the VAE decodes) and
whenever the streamer detaches (a re-plan or an unload moves the weights the graphs read).

Replayed calls give the eager call's bits (the fidelity rule: offloading must not change a single output bit):
bench.cuda_graph_check on fp8 calls (tests/unit/test_cuda_graphs_gpu.py), and the NewBie pipeline's sampled
latents with and without graphs (bench round newbie_fidelity, bench/results/workflows_e2e_*T1729, T1731). Which
calls are graphed: tests/integration/test_graph_calls_policy.py. LOWVRAM_CUDA_GRAPHS=0 turns the graphs off
everywhere (A/B in the benchmark).
"""
from __future__ import annotations

import logging
import os
import weakref

import torch

from ..offload.cuda_graphs import GraphedCalls, GraphStats, release_graph_memory
from ..quant import triton_launch
from . import _vram_registry as guard

log = logging.getLogger("lowvram")
ENV_SWITCH = "LOWVRAM_CUDA_GRAPHS"


def _patches_in(options: dict) -> bool:
    return any(options.get(k) for k in ("patches", "patches_replace"))


# (why a call runs eager, test on (session, running patcher, x, transformer_options)), asked in order.
EAGER_WHEN = (
    ("not on a CUDA device", lambda s, p, x, o: x.device.type != "cuda"),
    ("this model family is not verified for graphs", lambda s, p, x, o: not s.family.graph_capturable),
    ("blocks stream from host memory (only an all-resident plan is replayed)",
     lambda s, p, x, o: s.streamer is None or not all(s.streamer.plan.resident)),
    ("the blocks are being timed", lambda s, p, x, o: s.timing is not None),
    ("another patcher than the one attached", lambda s, p, x, o: s.attached_for is None or s.attached_for() is not p),
    ("CompileModelBlocks compiles the blocks", lambda s, p, x, o: s.compile_request(p) is not None),
    ("ComfyUI keeps part of the model in host memory (lowvram)",
     lambda s, p, x, o: bool(getattr(p.model, "model_lowvram", False))),
    ("model patches run in the call (transformer_options)", lambda s, p, x, o: _patches_in(o)),
    ("this Triton's kernel launcher cannot be captured", lambda s, p, x, o: not triton_launch.capturable()),
)


class SessionGraphs:
    """The CUDA graphs of one BlockStreamingSession (the session calls release and report)."""

    def __init__(self, session, enabled: bool):
        self._session = weakref.ref(session)   # the session owns this object
        self.switched_off = None if enabled else "cuda_graphs is off on the node"
        if os.environ.get(ENV_SWITCH, "1") == "0":
            self.switched_off = f"{ENV_SWITCH}=0"
        self.calls: GraphedCalls | None = None
        self.eager: dict[str, int] = {}   # why -> calls run eager for it (before GraphedCalls saw them)

    def wrapper(self, executor, *args, **kwargs):
        """ComfyUI's DIFFUSION_MODEL wrapper: (x, timesteps, context, ...) of one model call."""
        session = self._session()
        x = args[0] if args else kwargs.get("x")
        why = self.switched_off or self.eager_reason(session, x, kwargs.get("transformer_options") or {})
        if why is not None:
            self.eager[why] = self.eager.get(why, 0) + 1
            return executor(*args, **kwargs)
        if self.calls is None or self.calls.device != x.device:
            self.calls = GraphedCalls(x.device)
        return self.calls(executor, *args, **kwargs)

    @staticmethod
    def eager_reason(session, x, options: dict) -> str | None:
        if session is None or not isinstance(x, torch.Tensor):
            return "not a model call of a streaming session"
        running = getattr(session.patcher.model, "current_patcher", None) or session.patcher
        for why, applies in EAGER_WHEN:
            if applies(session, running, x, options):
                return why
        return None

    def release(self) -> None:
        """Drop the graphs (the weights they read are about to move, or the sampling ended)."""
        if self.calls is not None and self.calls.graphs:
            self.calls.clear()
            release_graph_memory(self.calls.device)

    def report(self) -> None:
        """After a sampling: one log line and a VRAMGuard report event; then the graphs go."""
        stats = self.calls.stats if self.calls is not None else GraphStats()
        eager = dict(self.eager)
        for why, n in stats.refused.items():
            eager[why] = eager.get(why, 0) + n
        if stats.replays or eager or stats.probed:
            guard.note({"kind": "cuda graphs", "captured": stats.captured, "replayed_calls": stats.replays,
                        "probe_calls": stats.probed, "eager_calls": eager})
            log.info("LowVRAM Kit ChunkedOffloadUNet: CUDA graphs: %d captured, %d model calls replayed, %d run "
                     "eager to probe%s", stats.captured, stats.replays, stats.probed,
                     "".join(f"; {n} eager: {why}" for why, n in eager.items()))
        self.eager.clear()
        self.release()
        if self.calls is not None:
            self.calls.forget()
