"""ChunkedOffloadUNet's CUDA-graph adapter (nodes/_graph_calls.py) inside ComfyUI, on the CPU: which calls may be
replayed from a graph and which run eager (and why), the wrapper on the node's clone, the switch, the report.

The capture and replay themselves need a GPU: bench.cuda_graph_check (tests/unit/test_cuda_graphs_gpu.py) and the
NewBie pipeline's latents with and without graphs (bench round newbie_fidelity) check them there.
"""
import importlib
import logging
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def graph_calls(comfy):
    from harness.pack_import import import_pack

    import_pack()
    return importlib.import_module("lowvram_kit.nodes._graph_calls")


class FakeSession(SimpleNamespace):
    """SimpleNamespace with a weak reference slot (SessionGraphs holds its session weakly)."""


def resident_session(**over):
    """A stand-in BlockStreamingSession whose every field lets a call be graphed; `over` changes one."""
    patcher = SimpleNamespace(model=SimpleNamespace(model_lowvram=False))
    patcher.model.current_patcher = patcher
    fields = dict(patcher=patcher, family=SimpleNamespace(graph_capturable=True),
                  streamer=SimpleNamespace(plan=SimpleNamespace(resident=(True, True))), timing=None,
                  attached_for=lambda: patcher, compile_request=lambda p: None)
    fields.update(over)
    return FakeSession(**fields)


CUDA_X = torch.empty(1, 16, 8, 8, device="meta")   # a tensor that is not on a CUDA device
ON_CUDA = SimpleNamespace(device=torch.device("cuda", 0))   # only .device is read by the conditions


def test_an_all_resident_eager_session_may_be_graphed(graph_calls):
    session = resident_session()
    reasons = [why for why, applies in graph_calls.EAGER_WHEN if applies(session, session.patcher, ON_CUDA, {})]
    assert reasons in ([], ["this Triton's kernel launcher cannot be captured"]), reasons
    assert graph_calls.SessionGraphs.eager_reason(session, CUDA_X, {}) == "not on a CUDA device"


@pytest.mark.parametrize("change, why", [
    ({"family": SimpleNamespace(graph_capturable=False)}, "this model family is not verified for graphs"),
    ({"streamer": SimpleNamespace(plan=SimpleNamespace(resident=(True, False)))}, "blocks stream from host memory"),
    ({"streamer": None}, "blocks stream from host memory"),
    ({"timing": object()}, "the blocks are being timed"),
    ({"attached_for": lambda: None}, "another patcher than the one attached"),
    ({"compile_request": lambda p: object()}, "CompileModelBlocks compiles the blocks"),
])
def test_each_condition_names_why_the_call_runs_eager(graph_calls, change, why):
    session = resident_session(**change)
    found = next(w for w, applies in graph_calls.EAGER_WHEN if applies(session, session.patcher, ON_CUDA, {}))
    assert found.startswith(why)


def test_lowvram_models_and_model_patches_run_eager(graph_calls):
    x = ON_CUDA
    session = resident_session()
    session.patcher.model.model_lowvram = True
    assert next(w for w, f in graph_calls.EAGER_WHEN if f(session, session.patcher, x, {})).startswith("ComfyUI keeps")
    session = resident_session()
    options = {"patches": {"attn1_patch": [print]}, "patches_replace": {}}
    assert next(w for w, f in graph_calls.EAGER_WHEN if f(session, session.patcher, x, options)).startswith("model patches")
    assert not any(f(session, session.patcher, x, {"patches": {}, "patches_replace": {}})
                   for w, f in graph_calls.EAGER_WHEN if w.startswith("model patches"))


def test_the_node_switch_and_the_environment_turn_graphs_off(graph_calls, monkeypatch):
    session = resident_session()
    off = graph_calls.SessionGraphs(session, enabled=False)
    calls = []
    out = off.wrapper(lambda *a, **k: calls.append(a) or "eager", CUDA_X)
    assert out == "eager" and off.eager == {"cuda_graphs is off on the node": 1}
    monkeypatch.setenv(graph_calls.ENV_SWITCH, "0")
    assert graph_calls.SessionGraphs(session, enabled=True).switched_off == "LOWVRAM_CUDA_GRAPHS=0"


def test_a_sampling_on_the_cpu_reports_its_eager_calls(comfy, graph_calls, tiny_model, caplog):
    """The real ChunkedOffloadUNet on the tiny NewBie DiT (its pooled vector through PooledPath's buffer): the wrapper
    sits on the clone, every call runs eager on the CPU, the sampling's log line says why, and the result is the
    plain model's."""
    import comfy.sample

    newbie = importlib.import_module("lowvram_kit.nodes.comfy_newbie_dit")
    streaming = importlib.import_module("lowvram_kit.nodes.comfy_block_streaming")
    model = newbie.load_newbie_dit(str(tiny_model("newbie")), torch.bfloat16)
    clone, session = streaming.stream_blocks(model, streaming.StreamingSettings(1 << 30, 0, 0, False))
    assert session.graphs.wrapper in [w for ws in clone.wrappers["diffusion_model"].values() for w in ws]
    g = torch.Generator().manual_seed(0)
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=g)
    cond = [[torch.randn(1, 6, 2560, generator=g), {"pooled_output": torch.randn(1, 1024, generator=g)}]]

    def run(m):
        with torch.no_grad():
            return comfy.sample.sample(m, noise, 2, 1.0, "euler", "simple", cond, cond, latent, disable_pbar=True)

    with caplog.at_level(logging.INFO, logger="lowvram"):
        streamed = run(clone)
    lines = [r.getMessage() for r in caplog.records if "CUDA graphs" in r.getMessage()]
    assert lines and "eager: not on a CUDA device" in lines[-1], lines
    assert session.graphs.eager == {}, "the counts start over with each sampling"
    assert torch.equal(streamed, run(model))
