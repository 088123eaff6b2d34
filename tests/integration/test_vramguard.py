"""VRAMGuard inside ComfyUI 0.3.75 on the CPU (in-process, through comfy.sample.sample).

Fault injection: a test-only APPLY_MODEL wrapper on the guarded clone raises torch.OutOfMemoryError at a
chosen model call; the guard must free, shrink and sample again from the same inputs, so the output equals
the uninjected run bit for bit (batch splits: within float32 rounding). The 50-run loop uses a small Flux
built from ComfyUI's own classes (hidden 32, 1+1 blocks: tens of ms a prompt); a few runs use the tiny
synthetic Flux-dev file. On the CPU the guard reads host RAM; block streaming honours its budget on the
CPU too, so the streamed re-plan after an OOM is exercised here as well.
"""
from __future__ import annotations

import gc
import json
import importlib
import logging
import random
import sys
import threading
import time
import types

import pytest
import torch

pytestmark = pytest.mark.comfy
GiB, MiB = 1 << 30, 1 << 20
STEPS = 4


@pytest.fixture(scope="module")
def pack(comfy):
    from harness.pack_import import import_pack

    root = import_pack()
    mods = {n: importlib.import_module(f"lowvram_kit.nodes.{m}") for n, m in (
        ("guard", "comfy_vram_guard"), ("node", "vram_guard"), ("policy", "_vram_policy"), ("vc", "_vram_comfy"),
        ("registry", "_vram_registry"), ("streaming", "comfy_block_streaming"), ("run", "_vram_run"))}
    return types.SimpleNamespace(root=root, **mods)


@pytest.fixture(autouse=True)
def quick_reports(pack, monkeypatch, tmp_path):
    """Reports land in a temporary output folder; the monitor's tail after sampling is short."""
    import folder_paths

    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    monkeypatch.setattr(pack.run, "TAIL_S", 0.05)
    yield tmp_path
    folder_paths.set_output_directory(old)


def small_flux(seed=0, depth=1, single=1):
    """Flux (ComfyUI's class, so the pack's family table and streaming see 'flux') at hidden 32, fp32."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=64,
               hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=depth, depth_single_blocks=single, axes_dim=[4, 6, 6],
               theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
    mc = comfy.supported_models.Flux(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


@pytest.fixture(scope="module")
def flux_small(comfy):
    return small_flux()


def inputs(seed=0, batch=1, side=8, ctx=64):
    g = torch.Generator().manual_seed(seed)
    latent = torch.zeros(batch, 16, side, side)
    noise = torch.randn(latent.shape, generator=g)
    cond = [[torch.randn(1, 8, ctx, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    return noise, latent, cond


def sample(model, seed=0, batch=1, steps=STEPS, sampler="euler", ctx=64, side=8):
    import comfy.sample

    noise, latent, cond = inputs(seed, batch, side, ctx)
    with torch.no_grad():
        return comfy.sample.sample(model, noise, steps, 1.0, sampler, "simple", cond, cond, latent, seed=seed,
                                   disable_pbar=True)


class Injector:
    """APPLY_MODEL wrapper: raises `error` at model call number `at` (1-based), `times` times in a row."""

    def __init__(self, at=1, times=1, error=None):
        self.at, self.times, self.calls, self.raised = at, times, 0, 0
        self.error = error or (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB "
                                                              "(injected by the test)"))
        self.seen_plans = []

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.at and self.raised < self.times:
            self.raised += 1
            raise self.error()
        return executor(*args, **kwargs)


def guarded(pack, model, policy="adapt", budget=0, headroom=GiB // 2, retries=2, report=True, injector=None):
    from comfy.patcher_extension import WrappersMP

    settings = pack.policy.GuardSettings(budget, headroom, policy, retries, report)
    clone, session = pack.guard.guard_model(model, settings, node_id="7")
    if injector is not None:
        clone = clone.clone()                      # what a LoRA loader after the guard would hand on
        clone.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test_inject", injector)
    return clone, session


def finished(session, timeout=5.0):
    """The report of the last run (the monitor watches TAIL_S after sampling before it writes)."""
    assert session.run.done.wait(timeout), "the run did not finish"
    return session.run.report


# ---- the node ----------------------------------------------------------------------------------------
def test_node_schema_and_registration(pack):
    node = pack.node.VRAMGuard
    req = node.INPUT_TYPES()["required"]
    assert list(req) == ["model", "budget_gb", "headroom_gb", "policy", "oom_retries", "report"]
    assert all(spec[1].get("tooltip") for spec in req.values())
    assert req["policy"][0] == ["adapt", "warn", "fail_fast"] and req["policy"][1]["default"] == "adapt"
    assert node.CATEGORY == "lowvram/utils" and node.RETURN_TYPES == ("MODEL",)
    assert pack.root.NODE_CLASS_MAPPINGS["VRAMGuard"] is node
    assert pack.root.NODE_DISPLAY_NAME_MAPPINGS["VRAMGuard"] == "VRAM Guard (LowVRAM)"


def test_node_returns_a_guarded_clone_and_leaves_its_input_alone(pack, flux_small):
    (clone,) = pack.node.VRAMGuard().guard(flux_small, 0.0, 0.5, "adapt", 2, True, unique_id=12)
    assert clone is not flux_small and clone.attachments[pack.guard.KEY].node_id == "12"
    assert pack.guard.KEY not in flux_small.attachments
    assert not flux_small.get_all_wrappers(pack.guard.WrappersMP.OUTER_SAMPLE)


def test_node_refuses_a_bad_policy_with_a_clear_message(pack, flux_small):
    with pytest.raises(ValueError, match="policy 'always' is not one of adapt, warn, fail_fast"):
        pack.node.VRAMGuard().guard(flux_small, 0.0, 0.5, "always", 2, True)


# ---- fault injection ---------------------------------------------------------------------------------
def test_fifty_random_ooms_give_the_uninjected_outputs(pack, flux_small, comfy_cleanup):
    refs = {seed: sample(flux_small, seed) for seed in range(5)}
    rng = random.Random(2024)
    for i in range(50):
        seed, at = i % 5, rng.randint(1, STEPS)          # euler, cfg 1: one model call per step
        inj = Injector(at=at)
        model, session = guarded(pack, flux_small, injector=inj)
        out = sample(model, seed)
        assert inj.raised == 1 and torch.equal(out, refs[seed]), (i, seed, at)
        rep = finished(session)
        assert rep["status"] == "finished" and [e["attempt"] for e in rep["events"]] == [1], rep["events"]
        assert [s["name"] for s in rep["memory"]["stages"]][:2] == ["sampling", "sampling, retry 1"]


def test_real_tiny_flux_dev_file_retries_to_the_same_output(pack, comfy, tiny_model, comfy_cleanup):
    model = comfy.sd.load_diffusion_model(str(tiny_model("flux-dev")))
    ref = sample(model, 3, steps=2, ctx=4096)
    for at in (1, 2, 2):
        guarded_model, session = guarded(pack, model, injector=Injector(at=at))
        assert torch.equal(sample(guarded_model, 3, steps=2, ctx=4096), ref), at
        assert finished(session)["events"][0]["kind"] == "oom"


def test_streamed_model_shrinks_its_resident_set_on_oom_and_restores_the_settings(pack, comfy_cleanup):
    flux6 = small_flux(depth=2, single=4)       # 6 blocks: two transfer slots hold less than all of them
    ref = sample(flux6, 1)
    settings = pack.streaming.StreamingSettings(GiB, 0, 0, False)          # everything resident
    streamed, stream_session = pack.streaming.stream_blocks(flux6, settings)
    plans = []

    class Watch(Injector):
        def __call__(self, executor, *args, **kwargs):
            out = super().__call__(executor, *args, **kwargs)
            plans.append(stream_session.streamer.plan)
            return out

    model, session = guarded(pack, streamed, injector=Watch(at=2))
    out = sample(model, 1)
    assert torch.equal(out, ref)
    first_budget = stream_session.settings.budget_bytes
    assert first_budget == GiB and stream_session.settings is settings          # restored after the prompt
    assert plans[0].streamed_groups == () and plans[-1].streamed_groups, [p.describe() for p in plans]
    assert plans[-1].budget_bytes < GiB
    rep = finished(session)
    assert rep["placement"] == "streamed"
    assert "diffusion weights on the device" in rep["events"][0]["change"]
    # Where the sampling stage's time went: the prediction, ComfyUI's loading, each attach and release of
    # the streamer (the OOM re-planned it: attached, released, attached again).
    whats = [t["what"] for t in rep["timings"]]
    assert whats[0] == "prediction" and "model loaded" in whats, whats
    assert whats.count("streaming attached") >= 2 and "streaming released" in whats, whats
    assert all(t["seconds"] >= 0 for t in rep["timings"])


def test_batch_is_split_after_an_oom_on_the_cpu(pack, flux_small, comfy_cleanup):
    ref = sample(flux_small, 2, batch=2)
    model, session = guarded(pack, flux_small, injector=Injector(at=2))
    out = sample(model, 2, batch=2)
    # One image at a time vs two together: the same math, float32 rounding may differ in the last bit.
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert finished(session)["events"][0]["change"] == "batch runs of 2 -> 1 image(s)"


def test_retries_run_out_with_an_oom_that_says_what_to_do(pack, flux_small, comfy_cleanup):
    model, session = guarded(pack, flux_small, retries=2, injector=Injector(at=1, times=99))
    with pytest.raises(torch.OutOfMemoryError, match="VRAMGuard: out of memory on attempt 3 of 3"):
        sample(model, 0)
    rep = session.run.report
    assert rep["status"] == "out of memory" and [e["attempt"] for e in rep["events"]] == [1, 2, 3]
    assert pack.registry.active() is None


def test_zero_retries_re_raise_the_first_oom(pack, flux_small, comfy_cleanup):
    model, session = guarded(pack, flux_small, retries=0, injector=Injector(at=1))
    with pytest.raises(torch.OutOfMemoryError, match="attempt 1 of 1"):
        sample(model, 0)


def test_a_cancel_is_not_retried_and_leaves_nothing_behind(pack, flux_small, comfy_cleanup):
    import comfy.model_management as mm

    settings = pack.streaming.StreamingSettings(GiB, 0, 0, False)
    streamed, stream_session = pack.streaming.stream_blocks(flux_small, settings)
    inj = Injector(at=2, error=mm.InterruptProcessingException)
    model, session = guarded(pack, streamed, injector=inj)
    with pytest.raises(mm.InterruptProcessingException):
        sample(model, 0)
    assert inj.raised == 1 and inj.calls == 2
    assert session.run.report["status"] == "cancelled" and pack.registry.active() is None
    assert stream_session.streamer is None and stream_session.settings is settings


# ---- policies and bad input --------------------------------------------------------------------------
def test_fail_fast_refuses_before_the_model_runs(pack, flux_small, comfy_cleanup):
    inj = Injector(at=999)
    model, session = guarded(pack, flux_small, policy="fail_fast", budget=MiB, headroom=0, injector=inj)
    with pytest.raises(pack.guard.VRAMGuardRefusal, match="refused before sampling: predicted peak .* Change:"):
        sample(model, 0)
    assert inj.calls == 0 and session.run.report["status"] == "refused"


def test_warn_runs_as_set_up_and_logs_the_warning(pack, flux_small, caplog, comfy_cleanup):
    ref = sample(flux_small, 0)
    model, session = guarded(pack, flux_small, policy="warn", budget=MiB, headroom=0)
    with caplog.at_level(logging.WARNING, logger="lowvram"):
        assert torch.equal(sample(model, 0), ref)
    assert any("warning: predicted peak" in r.getMessage() for r in caplog.records)
    assert finished(session)["decision"]["verdict"] == "over"


def test_adapt_that_cannot_fit_on_the_cpu_still_runs(pack, flux_small, comfy_cleanup):
    ref = sample(flux_small, 0)
    model, session = guarded(pack, flux_small, budget=MiB, headroom=0)
    assert torch.equal(sample(model, 0), ref)
    d = finished(session)["decision"]
    assert d["verdict"] == "over" and "runs anyway" in " ".join(d["messages"])


def test_budget_larger_than_the_machine_is_said_and_clamped(pack, flux_small, comfy_cleanup):
    model, session = guarded(pack, flux_small, budget=10**6 * GiB)
    sample(model, 0)
    msgs = " ".join(finished(session)["decision"]["messages"])
    assert "larger than the device" in msgs and "fits" in msgs


def test_nvml_failing_mid_prompt_leaves_a_guard_that_still_retries(pack, flux_small, monkeypatch, comfy_cleanup):
    class NVMLError(Exception):
        pass

    def broken(device):
        raise NVMLError("GPU is lost")
    monkeypatch.setattr(pack.guard, "read_memory", broken)
    ref = sample(flux_small, 4)
    model, session = guarded(pack, flux_small, injector=Injector(at=3))
    assert torch.equal(sample(model, 4), ref)
    rep = finished(session)
    assert rep["events"][0] == {"kind": "no prediction", "error": "NVMLError: GPU is lost"}
    assert rep["events"][1]["kind"] == "oom" and "decision" not in rep


def test_unknown_models_get_their_class_name_as_family(pack):
    assert pack.vc.family_name(torch.nn.Linear(2, 2)) == "Linear"


def test_reserve_vram_is_restored_even_on_error(pack):
    import comfy.model_management as mm

    old = mm.EXTRA_RESERVED_VRAM
    with pytest.raises(RuntimeError):
        with pack.vc.reserve_vram(GiB):
            assert mm.EXTRA_RESERVED_VRAM == old + GiB
            raise RuntimeError("x")
    assert mm.EXTRA_RESERVED_VRAM == old


# ---- monitoring and the report -----------------------------------------------------------------------
def test_report_reaches_the_ui_the_log_and_the_output_folder(pack, flux_small, quick_reports, monkeypatch,
                                                              caplog, comfy_cleanup):
    sent = []
    instance = types.SimpleNamespace(last_prompt_id="p1", send_sync=lambda e, d, sid=None: sent.append((e, d)),
                                     send_progress_text=lambda text, node, sid=None: sent.append(("text", node)))
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=instance)))
    model, session = guarded(pack, flux_small)
    with caplog.at_level(logging.INFO, logger="lowvram"):
        sample(model, 0)
        with pack.registry.stage("decoding"):       # what LazyVAEDecode does: ends the run at once
            assert pack.registry.active() is session.run
            assert pack.registry.decode_request() is None    # the CPU: no device decode request
        rep = session.run.report
    assert rep is not None and [s["name"] for s in rep["memory"]["stages"]] == ["sampling", "after sampling",
                                                                                "decoding"]
    assert rep["memory"]["source"] == "host RAM" and rep["memory"]["interval_ms"] <= 10
    events = [e for e, _ in sent]
    assert events == ["lowvram.vramguard.report", "text", "executed"], events
    payload = sent[0][1]
    assert payload["node"] == "7" and payload["prompt_id"] == "p1" and payload["image"]["subfolder"] == "vramguard"
    files = sorted(p.suffix for p in (quick_reports / "vramguard").iterdir())
    assert files == [".json", ".png"]
    assert any("VRAMGuard (finished)" in r.getMessage() for r in caplog.records)


def test_report_off_writes_no_files(pack, flux_small, quick_reports, comfy_cleanup):
    model, session = guarded(pack, flux_small, report=False)
    sample(model, 0)
    rep = finished(session)
    assert "memory" not in rep and not (quick_reports / "vramguard").exists()


def test_a_hundred_prompts_do_not_grow_memory(pack, flux_small, comfy_cleanup):
    """Successes, OOM retries (every 10th) and cancels (every 25th): RSS after the last prompt within
    64 MiB of after the first; no monitor threads or active runs left behind."""
    import comfy.model_management as mm

    def rss():
        gc.collect()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    first = None
    for i in range(100):
        inj = Injector(at=1) if i % 10 == 5 else \
            Injector(at=1, error=mm.InterruptProcessingException) if i % 25 == 24 else None
        model, session = guarded(pack, flux_small, injector=inj)
        try:
            sample(model, i % 3, steps=1)
        except mm.InterruptProcessingException:
            pass
        finished(session)
        del model, session
        if i == 0:
            first = rss()
    growth = rss() - first
    assert growth < 64 * MiB, f"RSS grew {growth / MiB:.1f} MiB over 100 prompts"
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name == "VRAMGuardMonitor"]
    assert pack.registry.active() is None


def test_the_timeline_starts_with_the_prompt(pack, flux_small, monkeypatch, comfy_cleanup):
    """ComfyUI calls IS_CHANGED when a prompt holding the node starts: text encoding is in the timeline."""
    node = pack.node.VRAMGuard
    assert node.IS_CHANGED(model=None, budget_gb=0.0, headroom_gb=0.5, policy="adapt", oom_retries=2,
                           report=True, unique_id="7") == ""
    with pack.registry.stage("text encoding"):      # what an encoder of the pack would mark
        time.sleep(0.03)
    model, session = guarded(pack, flux_small)
    sample(model, 0)
    stages = [s["name"] for s in finished(session)["memory"]["stages"]]
    assert stages[:4] == [pack.run.BEFORE, "text encoding", pack.run.BEFORE, "sampling"], stages
    assert not pack.run._pending


def test_a_streamed_model_sampled_outside_the_guard_while_its_watch_is_pending(pack, flux_small, comfy_cleanup):
    """A prompt with a guard node starts a watch (PendingRun) before any sampling; a streamed model sampled by
    another sampler meanwhile reports its attach timings to whatever is active: nothing may fail."""
    pack.node.VRAMGuard.IS_CHANGED(report=True, unique_id="77")
    try:
        assert isinstance(pack.registry.active(), pack.run.PendingRun)
        streamed, _ = pack.streaming.stream_blocks(flux_small, pack.streaming.StreamingSettings(GiB, 0, 0, False))
        assert torch.equal(sample(streamed, 1), sample(flux_small, 1))
    finally:
        pack.run._pending.pop("77").discard()


def test_an_unadopted_timeline_stops_at_the_next_prompt_or_after_a_while(pack, monkeypatch):
    node = pack.node.VRAMGuard
    node.IS_CHANGED(report=True, unique_id="9")
    first = pack.run._pending["9"]
    node.IS_CHANGED(report=True, unique_id="9")          # the next prompt: the old watch ends
    assert first.monitor.result is not None and pack.run._pending["9"] is not first
    node.IS_CHANGED(report=False, unique_id="9")         # report off: no watch at all
    assert "9" not in pack.run._pending
    monkeypatch.setattr(pack.run, "PENDING_S", 0.05)
    node.IS_CHANGED(report=True, unique_id="9")
    run = pack.run._pending["9"]
    time.sleep(0.3)
    assert "9" not in pack.run._pending and run.monitor.result is not None and pack.registry.active() is None


# ---- in a real headless server ----------------------------------------------------------------------------
def api_graph(policy="adapt", budget=0.0, seed=0):
    def node(cls, **inputs):
        return {"class_type": cls, "inputs": inputs}
    return {
        "1": node("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default"),
        "2": node("VRAMGuard", model=["1", 0], budget_gb=budget, headroom_gb=0.0, policy=policy, oom_retries=2,
                  report=True),
        "3": node("TinyTextEncoderLoader", clip_name1="t5xxl_fp16.safetensors", type="flux",
                  clip_name2="clip_l.safetensors"),
        "4": node("CLIPTextEncode", clip=["3", 0], text="a lighthouse"),
        "5": node("EmptySD3LatentImage", width=64, height=64, batch_size=1),
        "6": node("KSampler", model=["2", 0], seed=seed, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple",
                  positive=["4", 0], negative=["4", 0], latent_image=["5", 0], denoise=1.0),
        "7": node("SaveLatent", samples=["6", 0], filename_prefix="latents/guarded"),
    }


@pytest.mark.server
def test_in_a_server_the_report_lands_in_the_output_folder_and_caching_still_works(tmp_path, synthetic_dir,
                                                                                    tiny_model):
    from harness.paths import REPO_ROOT
    from harness.server import ComfyServer, ServerConfig, ServerError
    from harness.workflow_api import TEST_NODES_DIR

    for name in ("flux-dev", "t5xxl", "clip-l"):
        tiny_model(name)
    cfg = ServerConfig(base_dir=tmp_path / "base", models_dirs=(synthetic_dir,),
                       extra_node_dirs=(REPO_ROOT / TEST_NODES_DIR,))
    with ComfyServer(cfg) as srv:
        info = srv.object_info()["VRAMGuard"]
        assert info["input_order"]["required"] == ["model", "budget_gb", "headroom_gb", "policy", "oom_retries",
                                                   "report"]
        assert info["category"] == "lowvram/utils" and info["display_name"] == "VRAM Guard (LowVRAM)"
        entry = srv.wait(srv.queue(api_graph()), timeout_s=600)
        assert entry["status"]["completed"]
        reports = tmp_path / "base" / "output" / "vramguard"
        deadline = time.time() + 30              # the monitor watches TAIL_S after sampling, then writes
        while time.time() < deadline and not list(reports.glob("*.json")):
            time.sleep(0.2)
        (report,) = [json.loads(p.read_text()) for p in reports.glob("*.json")]
        stages = [s["name"] for s in report["memory"]["stages"]]
        assert stages[0].startswith("before sampling") and "sampling" in stages, stages   # started with the prompt
        assert report["family"] == "flux" and report["decision"]["verdict"] == "fits"
        assert list(reports.glob("*.png"))
        # The same prompt again: IS_CHANGED is constant, so ComfyUI serves every node from its cache.
        again = srv.wait(srv.queue(api_graph()), timeout_s=300)
        cached = [m for kind, m in again["status"]["messages"] if kind == "execution_cached"]
        assert cached and set(cached[0]["nodes"]) >= {"1", "2", "6"}, again["status"]["messages"]
        with pytest.raises(ServerError, match="refused before sampling"):
            srv.wait(srv.queue(api_graph(policy="fail_fast", budget=0.01, seed=1)), timeout_s=300)


# ---- the adapter's arithmetic on a (pretend) GPU --------------------------------------------------------
class FakeFluxPatcher:
    """What Placements reads of a ComfyUI patcher, for a 22 GiB Flux on a CUDA device (no GPU needed)."""

    def __init__(self, weight_bytes=22 * GiB, session=None, act_per_image=1016 * MiB):
        dm = torch.nn.Module()
        dm.w = torch.nn.Parameter(torch.empty(weight_bytes // 2, dtype=torch.bfloat16, device="meta"))
        self.model = types.SimpleNamespace(diffusion_model=dm,
                                           memory_required=lambda shape: shape[0] * act_per_image)
        self.load_device = torch.device("cuda", 0)
        self.attachments = {} if session is None else {"lowvram_block_streaming": session}


def test_placements_mirror_comfys_partial_loading_and_its_reserve(pack, monkeypatch):
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "EXTRA_RESERVED_VRAM", 400 * MiB)
    monkeypatch.setattr(mm, "MIN_WEIGHT_MEMORY_RATIO", 0.0)
    pl = pack.vc.Placements(FakeFluxPatcher(), (1, 16, 128, 128), 1, card_bytes=16 * GiB)
    assert pl.kind == "comfy" and pl.weight_bytes == 22 * GiB
    p0 = pl.placement_for(None)          # ComfyUI alone: free - (its activation estimate + 400 MiB reserved)
    assert p0.kind == "comfy_partial" and p0.resident_bytes == 16 * GiB - 1016 * MiB - 400 * MiB
    assert pl.placement_for(8 * GiB).resident_bytes == 8 * GiB
    # --reserve-vram raised so that ComfyUI keeps 8 GiB: it keeps free = card - 8 GiB = its minimum + reserve
    assert pl.reserve_for_cap(8 * GiB) == 8 * GiB - 1016 * MiB - 400 * MiB
    assert pl.reserve_for_cap(None) == 0
    full = pack.vc.Placements(FakeFluxPatcher(), (1, 16, 128, 128), 1, card_bytes=40 * GiB).placement_for(None)
    assert full.kind == "full" and full.resident_bytes == 22 * GiB


def test_placements_of_a_streamed_model_follow_the_offload_planner(pack):
    blocks = [torch.nn.Linear(256, 256) for _ in range(8)]            # 8 x 257 KiB
    settings = pack.streaming.StreamingSettings(0, 0, 0, False)
    session = types.SimpleNamespace(blocks=blocks, settings=settings, streamer=None, park=lambda why: None)
    patcher = FakeFluxPatcher(weight_bytes=4 * MiB, session=session, act_per_image=MiB)
    pl = pack.vc.Placements(patcher, (1, 16, 8, 8), 1, card_bytes=GiB)
    assert pl.kind == "streamed" and pl.non_block_bytes == 4 * MiB   # the blocks are not in the module tree here
    p_all = pl.placement_for(None)
    assert p_all.kind == "streamed" and p_all.buffer_bytes == 0 and p_all.resident_bytes == 4 * MiB + sum(
        pack.vc.block_nbytes(blocks))
    small = pl.placement_for(pl.floor + 2 * 263168)
    assert small.buffer_bytes > 0 and small.device_weight_bytes <= pl.floor + 2 * 263168
    token = pl.apply_cap(pl.floor + 2 * 263168)
    assert session.settings.budget_bytes == pl.streaming_budget(pl.floor + 2 * 263168)
    pack.vc.restore(token)
    assert session.settings is settings


def test_placements_plan_each_budget_once(pack, monkeypatch):
    """A decision asks for the same caps several times; each budget is planned once (Flux: 50-150 ms each)."""
    blocks = [torch.nn.Linear(256, 256) for _ in range(8)]
    settings = pack.streaming.StreamingSettings(0, 0, 0, False)
    session = types.SimpleNamespace(blocks=blocks, settings=settings, streamer=None, park=lambda why: None)
    pl = pack.vc.Placements(FakeFluxPatcher(weight_bytes=4 * MiB, session=session, act_per_image=MiB),
                            (1, 16, 8, 8), 1, card_bytes=GiB)
    calls = []
    real = pack.vc.plan_for
    monkeypatch.setattr(pack.vc, "plan_for", lambda *a, **k: calls.append(a[0].budget_bytes) or real(*a, **k))
    caps = [None, pl.floor + 2 * 263168, None, pl.floor + 2 * 263168, pl.floor - 1, pl.floor - 1]
    first = [pl.placement_for(c) for c in caps]
    assert [pl.placement_for(c) for c in caps] == first
    assert len(calls) == len(set(calls)) == 3, calls     # three distinct budgets; the refused one too


def test_read_memory_counts_nvml_free_torch_cache_and_what_comfy_can_unload(pack, monkeypatch):
    import comfy.model_management as mm

    dev = torch.device("cuda", 0)
    fake = pack.vc.MemoryReader("nvml (GPU 0)", lambda: 0, lambda: 5 * GiB, 24 * GiB)
    monkeypatch.setattr(pack.vc.MemoryReader, "open", staticmethod(lambda d: fake))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 2 * GiB)
    loaded = [types.SimpleNamespace(device=dev, model_loaded_memory=lambda: 6 * GiB),
              types.SimpleNamespace(device=torch.device("cpu"), model_loaded_memory=lambda: 9 * GiB)]
    monkeypatch.setattr(mm, "current_loaded_models", loaded)
    m = pack.vc.read_memory(dev)
    assert (m.free_bytes, m.reclaimable_bytes, m.total_bytes, m.source) == (6 * GiB, 6 * GiB, 24 * GiB, "nvml (GPU 0)")


def test_job_reading_text_tokens_cfg_and_splitting(pack):
    ctx = torch.zeros(1, 256, 4096)
    conds = {"positive": [{"cross_attn": ctx}], "negative": [{"cross_attn": torch.zeros(1, 77, 4096)}]}
    assert pack.vc.text_tokens(conds) == 256
    assert pack.vc.uses_cfg(types.SimpleNamespace(cfg=5.0, model_options={}), conds)
    assert not pack.vc.uses_cfg(types.SimpleNamespace(cfg=1.0, model_options={}), conds)
    assert pack.vc.uses_cfg(types.SimpleNamespace(cfg=1.0, model_options={"disable_cfg1_optimization": True}), conds)
    noise, latent = torch.zeros(2, 16, 8, 8), torch.zeros(2, 16, 8, 8)
    assert pack.guard.can_split(noise, latent, conds, {"latent_shapes": [latent.shape]})
    assert not pack.guard.can_split(noise[:1], latent[:1], conds, {})                       # batch 1
    assert not pack.guard.can_split(noise, latent[:1], conds, {})                           # latent not batched
    batched = {"positive": [{"cross_attn": torch.zeros(2, 256, 4096)}]}
    assert not pack.guard.can_split(noise, latent, batched, {})                            # a prompt per image
