"""VRAMGuard's decisions (nodes/_vram_policy.py): usable budget and bad budgets, fits / adapt / warn /
fail_fast with their messages, and the out-of-memory ladder. Placements are simple stand-ins for what the
adapter computes: a GPU model ComfyUI can offload down to nothing, a streamed model with a floor, the CPU.
"""

import pytest

from harness.pure_nodes import pure_node as pure


E, P = pure("_vram_estimate"), pure("_vram_policy")
GiB = E.GiB
FLUX_BYTES = 11_901_408_320 * 2


def flux(batch=1, side=128):
    return E.Workload(family="flux", batch=batch, latent_h=side, latent_w=side, weight_bytes=FLUX_BYTES,
                      params=11_901_408_320, text_tokens=256)


def comfy_gpu(weight_bytes=FLUX_BYTES):
    """ComfyUI keeps everything resident unless capped; it can offload down to nothing."""
    def placement_for(cap, images_per_run=None):
        if cap is None or cap >= weight_bytes:
            return E.Placement("full", weight_bytes, 0, 0)
        return E.Placement("comfy_partial", max(0, cap), 0, 0)
    return placement_for


def streamed(weight_bytes=FLUX_BYTES, floor=3 * GiB, as_set_up=16 * GiB):
    def placement_for(cap, images_per_run=None):
        dev = as_set_up if cap is None else max(floor, min(cap, weight_bytes))
        return E.Placement("streamed", dev - GiB if dev > floor else floor - GiB, GiB, floor)
    return placement_for


def cpu(cap, images_per_run=None):
    return E.Placement("cpu", 0)


def settings(policy="adapt", budget=0, headroom=GiB // 2, retries=2):
    return P.GuardSettings(budget_bytes=budget, headroom_bytes=headroom, policy=policy, oom_retries=retries)


def test_docstring_examples():
    import doctest
    failed, attempted = doctest.testmod(P)
    assert attempted > 0 and failed == 0


# ---- settings and usable budget ------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(policy="yolo"), "policy 'yolo' is not one of adapt, warn, fail_fast"),
    (dict(budget_bytes=-GiB), "budget_gb is negative"),
    (dict(headroom_bytes=-1), "headroom_gb is negative"),
    (dict(oom_retries=17), "oom_retries=17"),
])
def test_bad_settings_are_named(kw, match):
    base = dict(budget_bytes=0, headroom_bytes=GiB // 2, policy="adapt", oom_retries=2)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        P.GuardSettings(**base)


def test_zero_headroom_runs_with_a_warning():
    usable, notes = P.usable_bytes(settings(headroom=0), P.Memory(10 * GiB, 2 * GiB, 24 * GiB))
    assert usable == 12 * GiB and "headroom is 0" in notes[0]


def test_budget_zero_is_free_plus_what_comfy_can_unload_minus_headroom():
    usable, notes = P.usable_bytes(settings(), P.Memory(10 * GiB, 2 * GiB, 24 * GiB))
    assert usable == 12 * GiB - GiB // 2 and notes == []


def test_budget_larger_than_the_card_is_said_and_clamped():
    usable, notes = P.usable_bytes(settings(budget=48 * GiB), P.Memory(10 * GiB, 2 * GiB, 24 * GiB))
    assert usable == 12 * GiB - GiB // 2
    assert "larger than the device (24.00 GiB in all)" in notes[0]


def test_budget_above_what_is_free_names_what_others_hold():
    usable, notes = P.usable_bytes(settings(budget=16 * GiB), P.Memory(10 * GiB, 2 * GiB, 24 * GiB))
    assert usable == 12 * GiB - GiB // 2
    assert "more than this prompt can get (12.00 GiB" in notes[0] and "hold 12.00 GiB" in notes[0]


def test_budget_within_reach_is_used_as_given():
    usable, notes = P.usable_bytes(settings(budget=8 * GiB), P.Memory(10 * GiB, 2 * GiB, 24 * GiB))
    assert usable == 8 * GiB - GiB // 2 and notes == []


def test_headroom_larger_than_the_budget_leaves_nothing_and_says_so():
    usable, notes = P.usable_bytes(settings(budget=GiB, headroom=2 * GiB), P.Memory(10 * GiB, 0, 24 * GiB))
    assert usable == 0 and "lower the headroom" in notes[-1]


def test_reader_notes_reach_the_messages():
    _, notes = P.usable_bytes(settings(), P.Memory(GiB, 0, 2 * GiB, "torch", "NVML failed (x): using PyTorch"))
    assert notes == ["NVML failed (x): using PyTorch"]


# ---- decide ------------------------------------------------------------------------------------------
def test_fits_changes_nothing():
    d = P.decide(flux(), comfy_gpu(), settings(), 40 * GiB)
    assert d.verdict == "fits" and d.plan == P.RunPlan(1) and "fits" in d.text


def test_fail_fast_refuses_with_the_numbers_and_what_would_fit():
    d = P.decide(flux(), comfy_gpu(), settings("fail_fast"), 12 * GiB)
    assert d.verdict == "refused" and d.plan == P.RunPlan(1)
    assert "refused before sampling: predicted peak 23.04 GiB" in d.text and "vs 12.00 GiB usable" in d.text
    assert "what would fit: diffusion weights capped at" in d.text


def test_warn_runs_as_set_up_and_warns():
    d = P.decide(flux(), comfy_gpu(), settings("warn"), 12 * GiB)
    assert d.verdict == "over" and d.plan == P.RunPlan(1) and d.text.startswith("warning:")


def test_adapt_splits_a_batch_before_it_offloads_weights():
    # 22.17 GiB resident + 4 x 0.42 GiB activations (and as much allocator slack, Flux's reserve rule) does
    # not fit 24 GiB; 2 x 0.42 does.
    w = flux(batch=4)
    d = P.decide(w, comfy_gpu(), settings(), 24 * GiB)
    assert d.verdict == "adapted" and d.plan.weight_cap_bytes is None and d.plan.batch_chunk == 2, d.text
    assert "batch of 4 sampled as 2 runs of <= 2" in d.text and d.estimate.sampling_bytes <= 24 * GiB


def comfy_loads_by_run(card_bytes, weight_bytes=FLUX_BYTES, per_image=2 * GiB):
    """ComfyUI-like: it loads what fits beside its activation estimate for the run's batch."""
    def placement_for(cap, images_per_run=None):
        run = 4 if images_per_run is None else images_per_run
        resident = min(weight_bytes, card_bytes - run * per_image)
        resident = resident if cap is None else min(resident, cap)
        return E.Placement("full" if resident >= weight_bytes else "comfy_partial", max(0, resident), 0, 0)
    return placement_for


def test_a_split_batch_is_predicted_with_the_weights_comfyui_loads_for_the_smaller_runs():
    """Issue #6's NewBie row (1536 px, batch 4, 8 GiB): split into runs of 1, ComfyUI loaded the whole model
    (its estimate for one image left room) where the guard had assumed the partial load of the full
    batch, and predicted 6.15 GiB for a 7.92 GiB peak. Each chunk is now judged with its own placement."""
    w = flux(batch=4, side=192)
    placement_for = comfy_loads_by_run(card_bytes=28 * GiB)   # batch 4: 20 GiB of 22.17 loaded; runs of 1: all
    d = P.decide(w, placement_for, settings(), 24.5 * GiB)
    assert d.verdict == "adapted" and d.plan == P.RunPlan(1), d.text
    assert d.placement == placement_for(None, 1) and d.placement.kind == "full"
    assert d.estimate.sampling_bytes <= 24.5 * GiB
    # Judged with the full batch's 20 GiB, runs of 2 would have looked like a fit; with the weights ComfyUI
    # loads for runs of 2 (all of them) they do not.
    assert P.estimate(w, placement_for(None, None), 2).sampling_bytes <= 24.5 * GiB
    assert P.estimate(w, placement_for(None, 2), 2).sampling_bytes > 24.5 * GiB


def test_adapt_caps_the_weights_when_the_batch_cannot_help():
    d = P.decide(flux(), comfy_gpu(), settings(), 12 * GiB)
    assert d.verdict == "adapted" and d.plan.batch_chunk == 1
    cap = d.plan.weight_cap_bytes
    assert cap is not None and 10 * GiB < cap < 11 * GiB
    assert d.estimate.sampling_bytes <= 12 * GiB and d.placement.kind == "comfy_partial"
    assert "diffusion weights capped at" in d.text and "now predicted" in d.text


def test_decode_batches_by_memory_then_tiles():
    w = flux(batch=4, side=192)          # 1536 px: ~3.8 GiB of decode working set per image
    p = E.Placement("streamed", GiB, GiB // 2, GiB)
    d = P.decide(w, lambda cap, images_per_run=None: p, settings(), 9 * GiB)
    assert d.verdict == "fits" and d.plan.tile_px == 0, d.text     # the decoder takes one image per call
    d = P.decide(w, lambda cap, images_per_run=None: p, settings(), 3.5 * GiB)
    assert d.verdict == "adapted" and d.plan.batch_chunk == 1 and d.plan.tile_px == 1024, d.text
    assert d.estimate.decode_bytes <= 3.5 * GiB and "tiled VAE decode at 1024 px" in d.text


def test_adapt_that_cannot_fit_runs_the_smallest_plan_and_says_so():
    d = P.decide(flux(batch=2), streamed(), settings(), 3 * GiB)
    assert d.verdict == "over" and d.plan.batch_chunk == 1 and d.plan.weight_cap_bytes == 3 * GiB
    assert "runs anyway" in d.text and "will be retried" in d.text and "free" in d.suggestion


def test_batch_is_not_split_when_the_inputs_forbid_it():
    d = P.decide(flux(batch=4), comfy_gpu(), settings(), 23.5 * GiB, can_split=False)
    assert d.plan.batch_chunk == 4 and d.plan.weight_cap_bytes is not None


def test_notes_and_rough_estimates_are_in_the_messages():
    w = E.Workload(family="MysteryNet", batch=1, latent_h=64, latent_w=64, weight_bytes=4 * GiB, params=2 * 10**9)
    d = P.decide(w, comfy_gpu(4 * GiB), settings(), 40 * GiB, notes=["headroom is 0: ..."])
    assert d.messages[0] == "headroom is 0: ..." and "rough" in d.messages[1] and d.estimate.rough


# ---- after an OOM ----------------------------------------------------------------------------------
def test_oom_ladder_shrinks_weights_then_batch_then_repeats():
    w = flux(batch=4)
    place = streamed()
    plan, steps = P.RunPlan(4), []
    for _ in range(12):
        plan, change = P.after_oom(plan, w, place)
        steps.append((plan, change))
    caps = [p.weight_cap_bytes for p, _ in steps]
    assert caps[0] == int(16 * GiB * P.OOM_SHRINK) and caps[1] < caps[0]
    assert min(c for c in caps if c is not None) == 3 * GiB                     # never below the floor
    chunks = [p.batch_chunk for p, _ in steps]
    assert chunks[-1] == 1 and 2 in chunks and chunks == sorted(chunks, reverse=True)
    assert steps[-1][1].startswith("nothing left to shrink") and steps[-1][0] == steps[-2][0]


def test_oom_on_the_cpu_only_splits_the_batch():
    plan, change = P.after_oom(P.RunPlan(2), flux(batch=2), cpu)
    assert plan == P.RunPlan(1) and change == "batch runs of 2 -> 1 image(s)"
    plan, change = P.after_oom(plan, flux(batch=2), cpu)
    assert plan == P.RunPlan(1) and "same plan" in change
    plan, change = P.after_oom(P.RunPlan(2), flux(batch=2), cpu, can_split=False)
    assert plan == P.RunPlan(2) and "same plan" in change


def test_plan_descriptions():
    assert P.RunPlan(4).describe(4) == "no change"
    text = P.RunPlan(3, 8 * GiB, 512).describe(4)
    assert text == "diffusion weights capped at 8.00 GiB on the device; batch of 4 sampled as 2 runs of <= 3; " \
                   "tiled VAE decode at 512 px"
