"""offload.cuda_graphs.GraphedCalls on the CPU, with a stand-in for CUDA's capture and replay.

The stand-in replays by running the captured body again, which reads the static inputs and writes the static
outputs exactly as a replayed graph would: what is checked here is the bookkeeping (which call probes, which
captures, which replays, what each returns, what is refused and why, what a failed capture leaves). The real
capture runs in tests/unit/test_cuda_graphs_gpu.py, on a GPU.
"""
import contextlib
import itertools

import pytest
import torch

from offload import cuda_graphs
from offload.cuda_graphs import GraphedCalls, SYNC_ERROR_TEXT


class ReplayByRerun:
    def __init__(self, body):
        self.body = body
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.body()


class FakeBackend:
    def __init__(self):
        self.checking_syncs = False
        self.captures = 0
        self.rounds = 0

    def on_side_stream(self, outputs):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def sync_errors(self):
        self.checking_syncs = True
        try:
            yield
        finally:
            self.checking_syncs = False

    def new_round(self):
        self.rounds += 1

    def capture(self, body):
        self.captures += 1
        body()   # what a capture records runs once here (a real capture runs nothing)
        return ReplayByRerun(body)


class Model:
    """y = x * w + bias (a float in kwargs), recording the tensors each call saw."""

    def __init__(self, backend, syncs=False, fail_on_call=None):
        self.backend, self.syncs, self.fail_on_call = backend, syncs, fail_on_call
        self.seen: list[torch.Tensor] = []

    def __call__(self, x, w, bias=0.0, options=None):
        self.seen.append(x)
        if self.syncs and self.backend.checking_syncs:
            raise RuntimeError(f"called a {SYNC_ERROR_TEXT}")
        if self.fail_on_call is not None and len(self.seen) == self.fail_on_call:
            raise ValueError("Pointer argument cannot be accessed from Triton (cpu tensor?)")
        return {"out": x * w + bias, "n": 3}


def calls(**kw):
    backend = FakeBackend()
    return GraphedCalls("cpu", backend=backend, **kw), backend


def test_probe_then_capture_then_replay_with_each_calls_values():
    graphs, backend = calls()
    model = Model(backend)
    w = torch.tensor([2.0, 3.0])
    xs = [torch.tensor([1.0, 1.0]) * k for k in range(1, 5)]
    outs = [graphs(model, x, w, bias=1.0) for x in xs]
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out["out"], x * w + 1.0, atol=0, rtol=0)
        assert out["n"] == 3
    assert (graphs.stats.probed, graphs.stats.captured, graphs.stats.replays) == (1, 1, 3)
    assert model.seen[0] is xs[0], "the probe runs on the caller's tensors"
    assert model.seen[1] is not xs[1], "the capture runs on static copies"
    assert model.seen[2] is model.seen[1], "replays read the same static inputs"
    # Each result is a fresh tensor: holding one while the next call replays does not change it.
    assert outs[2]["out"].data_ptr() != outs[3]["out"].data_ptr()
    torch.testing.assert_close(outs[2]["out"], xs[2] * w + 1.0, atol=0, rtol=0)


def test_each_signature_gets_its_own_graph():
    graphs, backend = calls()
    model = Model(backend)
    w = torch.ones(2)
    small, large = torch.ones(2), torch.ones(3)
    for _ in range(3):
        graphs(model, small, w, options={"cond_or_uncond": [0]})
        graphs(model, small, w, options={"cond_or_uncond": [1]})
        graphs(model, large, torch.ones(3), options={"cond_or_uncond": [0]})
    assert len(graphs.graphs) == 3 and graphs.stats.captured == 3 and graphs.stats.replays == 6


def test_objects_are_keyed_by_identity_and_host_tensors_by_version():
    graphs, backend = calls()
    model = Model(backend)
    x, w, host = torch.ones(2), torch.ones(2), torch.ones(2)   # on "cpu" too, but the key treats them alike
    f, g = (lambda: 0), (lambda: 0)
    for fn in (f, f, g):
        graphs(model, x, w, options={"wrapper": fn})
    assert graphs.stats.probed == 2, "another object than the one captured is another signature"
    other = GraphedCalls("meta", backend=backend)   # here cpu tensors are 'host' tensors
    other(model, x, w, options={"sigmas": host})
    other(model, x, w, options={"sigmas": host})
    assert other.stats.probed == 1
    host.add_(1)   # an in-place change: a value the capture would have baked in
    other(model, x, w, options={"sigmas": host})
    assert other.stats.probed == 2


def test_a_call_that_syncs_is_refused_at_the_probe_and_runs_eager():
    graphs, backend = calls()
    model = Model(backend, syncs=True)
    w = torch.ones(2)
    outs = [graphs(model, torch.ones(2) * k, w) for k in range(3)]
    assert backend.captures == 0 and graphs.stats.captured == 0
    assert [o["out"].tolist() for o in outs] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    (why, n), = graphs.stats.refused.items()
    assert "synchronizing" in why and n == 3


def test_a_failed_capture_turns_graphs_off_and_keeps_what_it_allocated(monkeypatch):
    buried = []
    monkeypatch.setattr(cuda_graphs, "_BURIED", buried)

    class Burying(FakeBackend):
        def capture(self, body):
            try:
                return super().capture(body)
            except BaseException as e:
                cuda_graphs._bury(object(), e)
                raise

    backend = Burying()
    graphs = GraphedCalls("cpu", backend=backend)
    model = Model(backend, fail_on_call=2)   # the second call is the capture
    w = torch.ones(2)
    outs = [graphs(model, torch.ones(2) * k, w) for k in range(4)]
    assert [o["out"].tolist() for o in outs] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    assert graphs.disabled and "ValueError" in graphs.disabled and not graphs.graphs
    assert len(buried) == 1 and buried[0][2] is not None, "the failed capture's frames are kept"
    assert graphs.stats.refused[graphs.disabled] == 3   # the capture's call and the two after it ran eager


def test_outputs_that_change_shape_are_refused():
    graphs, backend = calls()
    shapes = itertools.chain([2], itertools.repeat(3))   # the first call's output differs from the later ones
    w = torch.ones(2)

    def model(x, w):
        return torch.ones(next(shapes))

    for _ in range(4):
        graphs(model, torch.ones(2), w)
    assert graphs.stats.captured == 0 and any("changed shape" in why for why in graphs.stats.refused)


def test_no_more_graphs_than_the_limit_and_forget_starts_over():
    graphs, backend = calls(max_graphs=1)
    model = Model(backend)
    for n in (2, 2, 3, 3, 3):
        graphs(model, torch.ones(n), torch.ones(n))
    assert graphs.stats.captured == 1
    assert any("more than 1 input signatures" in why for why in graphs.stats.refused)
    graphs.forget()
    assert not graphs.graphs and not graphs.probed and graphs.stats.probed == 0
    assert backend.rounds == 1, "after the graphs go, the next capture must not reuse their memory pool"
    graphs(model, torch.ones(3), torch.ones(3))
    graphs(model, torch.ones(3), torch.ones(3))
    assert graphs.stats.captured == 1


def test_inputs_that_require_grad_are_refused():
    graphs, backend = calls()
    model = Model(backend)
    w = torch.ones(2, requires_grad=True)
    for _ in range(3):
        graphs(model, torch.ones(2), w)
    assert graphs.stats.refused == {"an input tensor requires grad": 3}


@pytest.mark.parametrize("tree", [{"a": [1, (2.0, None)], "b": "s"}, (torch.float16, torch.device("cpu"))])
def test_keys_of_plain_values_are_hashable(tree):
    out, keep = [], []
    hash(cuda_graphs.tensor_leaves(tree, torch.device("cpu"), out, keep))
    assert not out and not keep
