"""ChunkedOffloadUNet refuses a VRAM budget below the model's floor before sampling starts (in-process, CPU),
and plans with block times measured once per latent shape.

The floor is the planner's (offload.floor): the cheapest arrangement of resident blocks and transfer slots,
plus ComfyUI's activation estimate for one model call, plus the streamer's margin. One model call holds
2 latents per image when CFG runs the negative. Each refusal must come before the first step: a
PREDICT_NOISE wrapper (it runs once per step, before the model) counts the steps that started, so a
refusal made only when the first step plans would fail these tests. A refusal leaves nothing behind.

On the CPU the "device" is the host, so budgets here are numbers the planner compares, not real VRAM;
the Flux is ComfyUI's own class at hidden size 32 (fp32), built in-process: no file, fast steps.
"""
import importlib
import types

import pytest
import torch

pytestmark = pytest.mark.comfy
MiB = 1 << 20
SIDE = 8  # latent side: [B, 16, 8, 8]


@pytest.fixture(scope="module")
def pack(comfy):
    from harness.pack_import import import_pack

    import_pack()
    return types.SimpleNamespace(streaming=importlib.import_module("lowvram_kit.nodes.comfy_block_streaming"),
                                 offload=importlib.import_module("lowvram_kit.offload"))


@pytest.fixture(scope="module")
def flux(tiny_flux_patcher):
    """Flux with 1 double + 3 single blocks: the double block is the largest, so the floor streams."""
    return tiny_flux_patcher(depth_single_blocks=3)


class StepCounter:
    """PREDICT_NOISE wrapper: counts the sampling steps that started (before the model is called)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        return executor(*args, **kwargs)


def streamed(pack, model, budget_bytes):
    from comfy.patcher_extension import WrappersMP

    settings = pack.streaming.StreamingSettings(budget_bytes, 0, 0, False)
    clone, session = pack.streaming.stream_blocks(model, settings)
    steps = StepCounter()
    clone.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, "test_steps", steps)
    return clone, session, steps


def run(model, cfg, steps=2, negative_tokens=8):
    import comfy.sample

    g = torch.Generator().manual_seed(0)
    latent = torch.zeros(1, 16, SIDE, SIDE)
    noise = torch.randn(latent.shape, generator=g)
    pos = [[torch.randn(1, 8, 64, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    neg = [[torch.randn(1, negative_tokens, 64, generator=g),
            {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    with torch.no_grad():
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, latent, seed=0,
                                   disable_pbar=True)


def floor_bytes(pack, session, model, latents_per_call):
    """The planner's floor for one model call on [latents_per_call, 16, 8, 8], made here, not by the adapter."""
    act = int(model.model.memory_required([latents_per_call, 16, SIDE, SIDE]))
    return pack.offload.floor(pack.offload.block_nbytes(session.blocks), act, margin_bytes=256 * MiB).budget_bytes


def assert_nothing_left(session, loaded_weight_bytes):
    assert session.streamer is None and session.attached_for is None
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in session.blocks)
    assert not any(getattr(m, "weight_function", None) or getattr(m, "bias_function", None)
                   for m in session.block_modules())
    assert session.patcher.model.model_loaded_weight_memory == loaded_weight_bytes


def test_explicit_budget_below_floor_is_refused_before_loading_and_names_the_fix(pack, flux, comfy, comfy_cleanup):
    import comfy.model_management as mm

    clone, session, steps = streamed(pack, flux, 0)
    floor2 = floor_bytes(pack, session, flux, 2)   # cfg 3: cond and uncond in one call
    assert floor2 > floor_bytes(pack, session, flux, 1) > 256 * MiB
    session.settings = pack.streaming.StreamingSettings(floor2 - 1, 0, 0, False)
    loaded = flux.model.model_loaded_weight_memory
    with pytest.raises(pack.streaming.BudgetTooSmall) as info:
        run(clone, cfg=3.0)
    assert steps.calls == 0, "refused only when the first step planned"
    assert not any(m is clone for m in mm.loaded_models()), "an explicit budget is checked before ComfyUI loads"
    msg = str(info.value)
    assert info.value.smallest_budget_bytes == floor2
    for part in ("(flux, Flux)", f"{floor2} bytes", "vram_budget_gb", "[2, 16, 8, 8]", "doubled by CFG",
                 "transfer slots", "activations", "margin", "lower the resolution or batch"):
        assert part in msg, (part, msg)
    suggested = float(msg.split("set vram_budget_gb to ")[1].split(" or more")[0])
    assert suggested * (1 << 30) >= floor2 and suggested % 0.25 == 0
    assert_nothing_left(session, loaded)

    # The smallest budget named is the one the first step's plan accepts: the same sampling runs with it.
    ok, ok_session, ok_steps = streamed(pack, flux, floor2)
    out = run(ok, cfg=3.0)
    assert ok_steps.calls == 2 and ok_session.streamer is not None
    plan = ok_session.streamer.plan  # made at the first step, for the 2 latents the check assumed
    assert plan.device_bytes <= floor2 and plan.activation_bytes == int(flux.model.memory_required([2, 16, SIDE, SIDE]))
    mm.unload_all_models()
    assert ok_session.streamer is None
    assert torch.equal(out, run(flux, cfg=3.0))


def test_cfg_doubles_the_latents_per_call(pack, flux, comfy_cleanup):
    clone, session, steps = streamed(pack, flux, 0)
    session.settings = pack.streaming.StreamingSettings(floor_bytes(pack, session, flux, 1), 0, 0, False)
    run(clone, cfg=1.0)  # cfg 1 skips the negative: one latent per call fits
    assert steps.calls == 2 and session.streamer is not None
    held, streamer_bytes = flux.model.model_loaded_weight_memory, session.streamer.device_bytes
    assert held >= streamer_bytes > 0
    with pytest.raises(pack.streaming.BudgetTooSmall) as info:
        run(clone, cfg=3.0)
    assert steps.calls == 2, "a step of the refused sampling started"
    assert info.value.smallest_budget_bytes == floor_bytes(pack, session, flux, 2)
    assert "doubled by CFG" in str(info.value) and "cfg 1.0 would halve them" in str(info.value)
    assert_nothing_left(session, held - streamer_bytes)  # the streamer of the first sampling is released


def test_auto_budget_is_free_memory_after_loading_and_refused_before_the_first_step(pack, flux, comfy_cleanup,
                                                                                    monkeypatch):
    import comfy.model_management as mm

    clone, session, steps = streamed(pack, flux, 0)
    floor2 = floor_bytes(pack, session, flux, 2)
    seen = []

    def free_bytes(device):
        seen.append(any(m is clone for m in mm.loaded_models()))
        return floor2 - 1

    monkeypatch.setattr(session, "free_bytes", free_bytes)
    loaded = flux.model.model_loaded_weight_memory
    with pytest.raises(pack.streaming.BudgetTooSmall) as info:
        run(clone, cfg=3.0)
    assert steps.calls == 0 and seen == [True], "auto reads free memory once ComfyUI loaded the rest"
    assert info.value.smallest_budget_bytes == floor2
    assert "(auto: the VRAM free after ComfyUI loaded the rest of the model)" in str(info.value)
    assert "free 1 B more VRAM" in str(info.value)
    mm.unload_all_models()
    assert_nothing_left(session, loaded)


def test_refused_first_step_plan_leaves_no_weight_patches(pack, flux):
    """The plan made at the first step still refuses (the safety net behind the check before sampling);
    the LoRA weight functions it installed on the blocks go with it."""
    clone, session, _ = streamed(pack, flux, 0)
    session.settings = pack.streaming.StreamingSettings(floor_bytes(pack, session, flux, 1) - 1, 0, 0, False)
    key = "diffusion_model.double_blocks.0.img_mlp.0.weight"
    clone.add_patches({key: (torch.zeros_like(flux.get_model_object(key)),)}, 1.0)
    with pytest.raises(pack.streaming.BudgetTooSmall):
        session.attach(clone, torch.device("cpu"), [1, 16, SIDE, SIDE])
    assert_nothing_left(session, flux.model.model_loaded_weight_memory)


def test_a_budget_the_blocks_alone_exceed_says_resolution_cannot_help(pack, flux, comfy_cleanup):
    clone, session, steps = streamed(pack, flux, 0)
    session.settings = pack.streaming.StreamingSettings(256 * MiB + 1, 2, 1, False)  # forced chunk and prefetch
    with pytest.raises(pack.streaming.BudgetTooSmall) as info:
        run(clone, cfg=1.0)
    msg = str(info.value)
    assert steps.calls == 0
    assert "lower resolution or batch cannot help" in msg and "lower the resolution" not in msg
    assert "set chunk_size and prefetch to 0 (auto)" in msg
    # with the forced chunk and prefetch, the floor's breakdown is what offload.floor says for them
    low = pack.offload.floor(pack.offload.block_nbytes(session.blocks), int(flux.model.memory_required(
        [1, 16, SIDE, SIDE])), chunk_size=2, prefetch=1, margin_bytes=256 * MiB)
    assert low.describe() in msg and info.value.smallest_budget_bytes == low.budget_bytes


class FakeEvent:
    """Stands in for torch.cuda.Event on the CPU: every block 'took' 1 ms."""

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return 1.0


def timed_on_cpu(pack, session, store_path):
    """Time blocks on the CPU with fake events, remembering them in `store_path` (not the user folder)."""
    from lowvram_kit.nodes._block_times import BlockTimes

    session.timed_devices, session.new_event = ("cpu",), FakeEvent
    session.times_store = BlockTimes(store_path)


def test_block_times_are_measured_once_per_latent_shape(pack, flux, comfy_cleanup, monkeypatch, tmp_path):
    """The second model call after the first load is timed and the plan remade with the times; a later load
    (ComfyUI unloaded the model in between) plans with them at once: one attach, no timing pass, no
    second packing. Another latent shape is timed anew. After a restart (a new session, the same file)
    the first load plans with the remembered times too."""
    import comfy.model_management as mm

    clone, session, _ = streamed(pack, flux, 0)
    session.settings = pack.streaming.StreamingSettings(floor_bytes(pack, session, flux, 2), 0, 0, False)
    timed_on_cpu(pack, session, tmp_path / "block_times.json")
    calls = []
    real = pack.streaming.offload_blocks

    def counting(*args, **kwargs):
        calls.append(kwargs.get("seconds_per_block"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pack.streaming, "offload_blocks", counting)
    run(clone, cfg=1.0, steps=1)   # one model call: the warm-up, never timed (it compiles kernels on a GPU)
    assert calls == [None] and session.block_seconds == {("cpu", (1, 16, SIDE, SIDE), False): None}
    mm.unload_all_models()
    calls.clear()
    out = run(clone, cfg=1.0)
    assert calls[0] is None and list(session.block_seconds) == [("cpu", (1, 16, SIDE, SIDE), False)]
    seconds = session.block_seconds[("cpu", (1, 16, SIDE, SIDE), False)]
    assert seconds == [0.001] * len(session.blocks)
    first = len(calls)
    mm.unload_all_models()
    assert session.streamer is None
    assert torch.equal(run(clone, cfg=1.0), out)
    assert calls[first:] == [seconds], "a later load re-timed or re-planned"
    mm.unload_all_models()
    run(clone, cfg=3.0)  # cond and uncond in one call: [2, 16, 8, 8], a shape not timed yet
    assert set(session.block_seconds) == {("cpu", (1, 16, SIDE, SIDE), False), ("cpu", (2, 16, SIDE, SIDE), False)}
    mm.unload_all_models()

    restarted, fresh, _ = streamed(pack, flux, 0)   # as after a server restart: nothing in memory
    fresh.settings = session.settings
    timed_on_cpu(pack, fresh, tmp_path / "block_times.json")
    calls.clear()
    assert torch.equal(run(restarted, cfg=1.0), out)
    assert calls == [seconds], "the first load after a restart timed again"


class FakeStepMemory:
    """Stands in for StepMemory on the CPU: every timed step 'took' `nbytes` of activations."""

    def __init__(self, nbytes):
        self.nbytes, self.activation_bytes = nbytes, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.activation_bytes = self.nbytes


def test_the_measured_activation_memory_replaces_comfys_estimate_in_later_plans(pack, flux, comfy_cleanup, tmp_path):
    """The timed step also reads the memory its activations took; the re-plan reserves that (+10%) instead of
    ComfyUI's estimate, and a later load, after a restart too, plans with it from the block-time file."""
    import comfy.model_management as mm

    clone, session, _ = streamed(pack, flux, 0)
    session.settings = pack.streaming.StreamingSettings(floor_bytes(pack, session, flux, 2), 0, 0, False)
    timed_on_cpu(pack, session, tmp_path / "block_times.json")
    measured = 3 * MiB
    session.memory_probe = lambda device: FakeStepMemory(measured)
    out = run(clone, cfg=1.0)
    key = ("cpu", (1, 16, SIDE, SIDE), False)
    estimate = int(flux.model.memory_required([1, 16, SIDE, SIDE]))
    assert measured * 1.1 < estimate, "the fake measurement must differ from the estimate to show which is used"
    assert session.activation_measured[key] == measured
    # what the floor check and VRAMGuard count from now on for this shape: the measurement, not the estimate
    assert session.activation_to_plan(clone, torch.device("cpu"), [1, 16, SIDE, SIDE]) == int(measured * 1.1)
    assert session.activation_to_plan(clone, torch.device("cpu"), [2, 16, SIDE, SIDE]) == int(
        flux.model.memory_required([2, 16, SIDE, SIDE]))   # a shape never measured
    # the margin shrinks with a measurement (the allocator's slack is inside it) and only then
    assert session.margin_to_plan(clone, torch.device("cpu"), [1, 16, SIDE, SIDE]) == 64 * MiB
    assert session.margin_to_plan(clone, torch.device("cpu"), [2, 16, SIDE, SIDE]) == 256 * MiB
    mm.unload_all_models()
    run(clone, cfg=1.0)   # a later load of the same session plans with the measurement at once
    assert session.streamer.plan.activation_bytes == int(measured * pack.streaming.MEASURED_ACTIVATION_SAFETY)
    assert session.streamer.plan.margin_bytes == pack.streaming.MEASURED_MARGIN_BYTES
    mm.unload_all_models()

    restarted, fresh, _ = streamed(pack, flux, 0)   # a new session reading the same file
    fresh.settings = session.settings
    timed_on_cpu(pack, fresh, tmp_path / "block_times.json")
    fresh.memory_probe = lambda device: pytest.fail("a known shape must not be measured again")
    assert torch.equal(run(restarted, cfg=1.0), out)
    assert fresh.streamer.plan.activation_bytes == int(measured * 1.1) and fresh.timing is None
    mm.unload_all_models()


def test_a_measurement_no_plan_fits_keeps_the_running_plan(pack, flux, comfy_cleanup, tmp_path, caplog):
    """A timed step whose activations exceed what the budget could ever leave room for must not stop the
    sampling in its second step: the plan that ran stays, with a warning."""
    import logging

    import comfy.model_management as mm

    clone, session, _ = streamed(pack, flux, 0)
    session.settings = pack.streaming.StreamingSettings(floor_bytes(pack, session, flux, 2), 0, 0, False)
    timed_on_cpu(pack, session, tmp_path / "block_times.json")
    session.memory_probe = lambda device: FakeStepMemory(64 << 30)   # 64 GiB: no plan fits
    with caplog.at_level(logging.WARNING, logger="lowvram"):
        out = run(clone, cfg=1.0)
    assert out is not None and "keeping the current plan for this sampling" in caplog.text
    mm.unload_all_models()


def test_with_cfg_the_plan_leaves_comfy_room_to_batch_cond_and_uncond(pack, flux, comfy_cleanup, caplog):
    """ComfyUI runs cond and uncond as one call only while 1.5x its estimate for the pair is free; a plan with
    room to spare keeps that much free (fewer resident blocks), a tight one keeps the least a call needs, and
    the counts of model calls say which ComfyUI did."""
    import logging

    import comfy.model_management as mm

    factor = pack.streaming.COMFY_BATCH_FREE_FACTOR
    estimate2 = int(flux.model.memory_required([2, 16, SIDE, SIDE]))
    room = int(estimate2 * factor)
    probe = streamed(pack, flux, 0)[1]   # a session only for its blocks
    with_room = pack.offload.floor(pack.offload.block_nbytes(probe.blocks), room, margin_bytes=256 * MiB).budget_bytes
    assert with_room > floor_bytes(pack, probe, flux, 2)

    clone, session, _ = streamed(pack, flux, with_room)
    with caplog.at_level(logging.INFO, logger="lowvram"):
        run(clone, cfg=3.0)
    assert session.streamer.plan.activation_bytes == room
    assert session.calls.by_latents == {2: 2} and session.calls.split == 0   # 2 steps, each one call of 2
    assert "2 model calls, latents per call {2: 2}" in caplog.text
    mm.unload_all_models()

    run(clone, cfg=1.0)   # no negative: nothing to batch, no room kept
    assert session.streamer.plan.activation_bytes == int(flux.model.memory_required([1, 16, SIDE, SIDE]))
    assert session.calls.by_latents == {1: 2} and session.calls.split == 0
    mm.unload_all_models()

    tight, tight_session, _ = streamed(pack, flux, with_room - 1)   # the room does not fit: the least a call needs
    run(tight, cfg=3.0)
    assert tight_session.streamer.plan.activation_bytes == estimate2
    mm.unload_all_models()


def test_calls_that_comfy_split_are_counted_and_reported(pack, flux, comfy_cleanup, monkeypatch, caplog):
    """Where ComfyUI finds too little free once the blocks are on the device (here: its free-memory reading made
    small after the first call), it runs cond and uncond one by one; the session counts those calls and warns
    why. Prompts whose token counts ComfyUI does not concatenate (8 and 40: lcm 40 is 5x the shorter) run apart
    from the first call on: said without a warning, and the plan keeps no room for a batch that never comes."""
    import logging

    import comfy.model_management as mm
    import comfy.samplers

    clone, session, _ = streamed(pack, flux, 1 << 30)
    real = mm.get_free_memory

    def little_free_once_attached(dev=None, torch_free_too=False):   # attention asks with torch_free_too
        return 1 if session.streamer is not None and not torch_free_too else real(dev, torch_free_too)

    monkeypatch.setattr(comfy.samplers.model_management, "get_free_memory", little_free_once_attached)
    with caplog.at_level(logging.INFO, logger="lowvram"):
        run(clone, cfg=3.0)
    assert session.calls.by_latents == {2: 1, 1: 2} and session.calls.split == 2
    assert "ComfyUI ran cond and uncond as separate model calls in 2 of 3 calls" in caplog.text
    mm.unload_all_models()
    monkeypatch.undo()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lowvram"):
        run(clone, cfg=3.0, negative_tokens=40)
    assert session.calls.by_latents == {1: 4} and session.calls.split == 4
    assert "their conditionings having shapes it does not concatenate" in caplog.text
    assert "WARNING" not in [r.levelname for r in caplog.records if "model calls" in r.getMessage()]
    assert session.streamer.plan.activation_bytes == int(flux.model.memory_required([1, 16, SIDE, SIDE]))
    mm.unload_all_models()
