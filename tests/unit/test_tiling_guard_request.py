"""LazyVAEDecode answering VRAMGuard's request for tiles (nodes/_tiling.py `max_tile_px`, the log line of
nodes/_vae_comfy.py, the registry's `note`): every tiling mode with and without a request."""
import logging

import pytest

from harness.pure_nodes import pure_node

T, V, REG = pure_node("_tiling"), pure_node("_vae_comfy"), pure_node("_vram_registry")
GiB = T.GiB
WHY = ("predicted peak 11.90 GiB vs 7.50 GiB usable: does not fit, so VRAMGuard changed: tiled VAE decode at "
       "256 px.")


def req(**kw):
    # 512x512 px Flux (64x64 latent), plenty of memory: auto alone decodes it whole
    base = dict(batch=1, latent_h=64, latent_w=64, upscale=8, bytes_per_out_px=2178 * 2,
                weight_bytes=168 << 20, free_bytes=24 * GiB, mode="auto", tile_px=0, overlap_px=64)
    base.update(kw)
    return T.DecodeRequest(**base)


def side_px(plan):
    return max(plan.tile_hw) * 8


# mode, the user's tile_size, the guard's tile_px (0: no request) -> tiled?, largest tile side in px
PLANS = [
    ("auto", 0, 0, False, 512),        # no request: whole, as before
    ("auto", 0, 256, True, 256),       # the request tiles a decode that fits
    ("auto", 0, 1024, False, 512),     # a request larger than the image changes nothing
    ("auto", 384, 256, True, 256),     # a set tile size larger than the request: the request
    ("auto", 128, 256, True, 128),     # ... smaller: the user's
    ("never", 0, 0, False, 512),
    ("never", 0, 256, False, 512),     # the user's explicit choice wins (the node warns)
    ("never", 128, 256, False, 512),
    ("always", 0, 0, False, 512),      # the default 512-px tile holds the whole image
    ("always", 0, 256, True, 256),
    ("always", 128, 256, True, 128),   # the smaller of the user's tile and the request
    ("always", 384, 256, True, 256),
]


@pytest.mark.parametrize("mode,tile_px,asked_px,tiled,side", PLANS)
def test_plan_for_each_mode_with_and_without_a_request(mode, tile_px, asked_px, tiled, side):
    p = T.plan_decode(req(mode=mode, tile_px=tile_px, max_tile_px=asked_px))
    assert p.tiled == tiled and side_px(p) <= side, p.describe()
    if tiled:
        assert side_px(p) > side // 2          # as few tiles as the limit allows, not needlessly small
    if tiled and tile_px in (0, 384):
        assert "VRAMGuard" in p.reason, p.reason


def test_the_request_is_a_limit_not_a_size_when_memory_is_short():
    free = T.plan_decode(req(latent_h=128, latent_w=128, free_bytes=1 * GiB))      # 1024 px, 1 GiB free
    asked = T.plan_decode(req(latent_h=128, latent_w=128, free_bytes=1 * GiB, max_tile_px=768))
    assert asked.tile_hw == free.tile_hw and side_px(asked) < 768 and "exceeds" in asked.reason


def test_a_wide_image_keeps_both_tile_sides_within_the_request():
    # 128x2048 px: without a request the short side leaves its area to the long one (tiles wider than tall)
    plain = T.plan_decode(req(latent_h=16, latent_w=256, mode="always"))
    assert plain.tile_hw[1] > 64
    p = T.plan_decode(req(latent_h=16, latent_w=256, mode="always", max_tile_px=512))
    assert p.tiled and p.tile_hw[0] == 16 and p.tile_hw[1] <= 64


def test_a_tiny_request_stops_at_the_smallest_tile():
    p = T.plan_decode(req(max_tile_px=8))
    assert max(p.tile_hw) == T.TilingPolicy().min_tile_latent


def test_a_negative_request_is_named():
    with pytest.raises(ValueError, match=r"max tile size \(-1\) must be >= 0"):
        req(max_tile_px=-1)


# ---- what the node says -------------------------------------------------------------------------------
def test_no_request_says_nothing():
    plan = T.plan_decode(req())
    assert V.guard_answer(None, req(), plan) is None
    assert V.guard_answer(REG.DecodeRequest(0, 8 * GiB, ""), req(), plan) is None     # a byte cap only


def test_a_followed_request_is_logged_with_the_guards_reason():
    ask = REG.DecodeRequest(256, 8 * GiB, WHY)
    r = req(max_tile_px=256)
    plan = T.plan_decode(r)
    assert plan.tile_hw == (27, 27)         # 3 x 27 latent px with 8 of overlap cover 64 (2 x 32 would not)
    level, text = V.guard_answer(ask, r, plan)
    assert level == logging.INFO
    assert text == f"LowVRAM Kit: LazyVAEDecode tiles at 216 px because VRAMGuard asked: {WHY}"


def test_tiling_never_warns_that_the_guard_asked():
    ask = REG.DecodeRequest(256, 8 * GiB, WHY)
    r = req(mode="never", max_tile_px=256)
    level, text = V.guard_answer(ask, r, T.plan_decode(r))
    assert level == logging.WARNING
    assert "tiling=never" in text and "at most 256 px" in text
    assert f"{WHY[:-1]}. Set tiling to auto to follow it" in text


def test_an_image_smaller_than_the_request_is_decoded_whole_and_says_so():
    ask = REG.DecodeRequest(1024, 8 * GiB, WHY)
    r = req(max_tile_px=1024)
    level, text = V.guard_answer(ask, r, T.plan_decode(r))
    assert level == logging.INFO and "whole images" in text and "1024 px" in text


# ---- the registry carries the node's note to the guard's report -----------------------------------------
def test_note_reaches_the_active_run_and_is_a_no_op_without_one():
    REG.note({"kind": "decode"})                    # no guard: nothing happens, nothing raises

    class Run:
        events = []

        def note(self, event):
            self.events.append(event)

    run = Run()
    REG.activate(run)
    try:
        REG.note({"kind": "decode", "tile_px": 256})
    finally:
        REG.deactivate(run)
    assert run.events == [{"kind": "decode", "tile_px": 256}]
