"""LazyVAEDecode's pure logic (nodes/_tiling.py): spans, blend weights, plans, seams, OOM fallbacks.

The module is loaded from its file: the repo's `nodes` package name collides with ComfyUI's nodes.py.
"""
import doctest

import pytest
import torch

from harness.pure_nodes import pure_node

T = pure_node("_tiling")
GiB = T.GiB
FLUX_BPP = 2178 * 2          # ComfyUI's KL-VAE estimate in bf16: bytes per output pixel
FLUX_WEIGHTS = 168 << 20


def req(**kw):
    base = dict(batch=1, latent_h=128, latent_w=128, upscale=8, bytes_per_out_px=FLUX_BPP,
                weight_bytes=FLUX_WEIGHTS, free_bytes=80 * GiB, mode="auto", tile_px=0, overlap_px=64)
    base.update(kw)
    return T.DecodeRequest(**base)


def test_docstring_examples():
    assert doctest.testmod(T).failed == 0


# ---- spans and weights ------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 7, 16, 33, 64, 100, 128, 257])
@pytest.mark.parametrize("tile,overlap", [(8, 2), (16, 4), (17, 0), (40, 8), (68, 8), (300, 16)])
def test_spans_cover_the_axis_with_equal_tiles_and_enough_overlap(length, tile, overlap):
    spans = T.axis_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    sizes = {b - a for a, b in spans}
    assert len(sizes) == 1 and sizes.pop() <= max(tile, length if length <= tile else tile)
    if length <= tile:
        assert spans == ((0, length),)
    for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
        assert a0 < a1 and b0 - a1 >= overlap       # neighbours overlap by at least `overlap`
    if length > tile:
        n_min = -(-(length - overlap) // (tile - overlap))
        assert len(spans) == n_min                   # no more tiles than the requested size needs


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("length,tile,overlap,up", [(128, 68, 8, 8), (37, 10, 2, 1), (64, 20, 5, 4), (30, 30, 4, 8)])
def test_blend_weights_are_a_partition_of_unity(length, tile, overlap, up, fraction):
    spans = T.axis_spans(length, tile, overlap)
    ws = T.axis_weights(spans, up, fraction)
    total = torch.zeros(length * up, dtype=torch.float64)
    for (a, _b), w in zip(spans, ws):
        assert (w >= 0).all() and (w <= 1).all()
        total[a * up:a * up + len(w)] += w.double()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    # 2-D weights are products of the axis weights, so they sum to 1 as well
    wy = torch.zeros(length * up, length * up, dtype=torch.float64)
    for (ay, _), wyi in zip(spans, ws):
        for (ax, _), wxi in zip(spans, ws):
            wy[ay * up:ay * up + len(wyi), ax * up:ax * up + len(wxi)] += wyi.double()[:, None] * wxi.double()[None, :]
    assert torch.allclose(wy, torch.ones_like(wy), atol=1e-6)


def test_ramp_gives_no_weight_to_a_tiles_outer_pixels():
    spans = T.axis_spans(64, 24, 8)
    w = T.axis_weights(spans, upscale=8, ramp_fraction=0.5)
    zone = (spans[0][1] - spans[1][0]) * 8
    assert float(w[0][-zone // 4:].max()) == 0.0       # outer quarter of tile 0 inside the overlap
    assert float(w[1][:zone // 4].max()) == 0.0
    assert float(w[0][0]) == 1.0 and float(w[-1][-1]) == 1.0     # image borders keep full weight


# ---- a toy decoder: local (convs + upsampling), so tiles with enough overlap are exact -----------------
class LocalDecoder(torch.nn.Module):
    """latent [B, 4, h, w] -> image [B, 3, 8h, 8w]; a 1x1 conv, then 3x3 convs after each 2x upsampling:
    the receptive field reaches 0.5 + 0.25 + 0.125 latent px (7 output px) to each side."""

    def __init__(self, channels=4, tone_per_tile=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(c_in, c_out, k, padding=k // 2)
                                         for c_in, c_out, k in [(channels, 8, 1), (8, 8, 3), (8, 8, 3), (8, 3, 3)])
        for c in self.convs:
            torch.nn.init.normal_(c.weight, 0, 0.3, generator=g)
        self.tone_per_tile = tone_per_tile
        self.calls = []

    def forward(self, z):
        self.calls.append(tuple(z.shape))
        x = self.convs[0](z)
        for conv in self.convs[1:]:
            x = conv(torch.nn.functional.interpolate(torch.tanh(x), scale_factor=2.0, mode="nearest"))
        if self.tone_per_tile:      # like GroupNorm over a tile: a per-call brightness shift
            x = x + 0.3 * z.mean(dim=(1, 2, 3), keepdim=True)
        return x


def decode_all(latent, plan, r, dec, **hooks):
    return T.run_decode(latent, plan, r, T.Hooks(decode=lambda z, where: dec(z), **hooks))


@pytest.mark.parametrize("h,w,tile,batch,chunk", [(24, 40, 16, 1, 1), (33, 17, 16, 2, 2), (16, 64, 16, 3, 2), (40, 40, 20, 1, 1)])
def test_tiled_equals_untiled_for_a_local_decoder(h, w, tile, batch, chunk):
    torch.manual_seed(1)
    dec = LocalDecoder()
    z = torch.randn(batch, 4, h, w)
    with torch.no_grad():
        ref = dec(z)
        r = req(batch=batch, latent_h=h, latent_w=w, mode="always", overlap_px=4 * 8)
        plan = T._plan(r, T.TilingPolicy(), min(tile, h), min(tile, w), 1e18, "test")
        plan = T.replace(plan, batch_chunk=chunk)
        assert plan.tiled
        out, used = decode_all(z, plan, r, dec)
    # Tolerance: float32 rounding only. Overlap 4 latent px = 32 output px; the ramp (central half) gives
    # weight 0 to a tile's outer 8 px, more than the decoder's 7-px reach: wherever a tile has weight it
    # computed exactly what the whole decode computes.
    assert out.shape == ref.shape and used is plan
    assert (out - ref).abs().max() < 1e-5


def test_without_overlap_the_tile_borders_show():
    # The same check fails without overlap: proves the test above can fail.
    dec = LocalDecoder()
    z = torch.randn(1, 4, 24, 40)
    with torch.no_grad():
        ref = dec(z)
        r = req(latent_h=24, latent_w=40, mode="always", overlap_px=0)
        out, _ = decode_all(z, T._plan(r, T.TilingPolicy(), 12, 12, 1e18, "test"), r, dec)
    assert (out - ref).abs().max() > 1e-2


def seam_score(img, cols):
    """Mean |jump| between neighbouring columns at `cols` over the mean jump elsewhere (1 = invisible)."""
    d = (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))
    mask = torch.zeros_like(d, dtype=torch.bool)
    mask[cols] = True
    return float(d[mask].mean() / d[~mask].mean())


def test_blending_hides_a_per_tile_tone_shift():
    # GroupNorm in a real VAE normalises each tile by its own statistics: each tile gets its own tone.
    # A hard cut shows that as a seam; the ramp spreads it over the overlap.
    dec = LocalDecoder(tone_per_tile=True)
    z = torch.randn(1, 4, 16, 64) + torch.linspace(-2, 2, 64)      # tone differs along x
    r = req(latent_h=16, latent_w=64, mode="always", overlap_px=8 * 8)
    with torch.no_grad():
        plan = T._plan(r, T.TilingPolicy(ramp_fraction=1.0), 16, 24, 1e18, "test")
        blended, _ = decode_all(z, plan, r, dec)
        r0 = T.replace(r, overlap_px=0)
        hard, _ = decode_all(z, T._plan(r0, T.TilingPolicy(), 16, 16, 1e18, "test"), r0, dec)
    cut_cols = [8 * b - 1 for _a, b in T._plan(r0, T.TilingPolicy(), 16, 16, 1e18, "t").xs[:-1]]
    assert seam_score(hard, cut_cols) > 1.5
    # in the blended image no column stands out: the largest column jump is near the typical one
    d = (blended[..., 1:] - blended[..., :-1]).abs().mean(dim=(0, 1, 2))
    assert float(d.max() / d.median()) < 3.0


# ---- plans --------------------------------------------------------------------------------------------
def test_auto_decodes_whole_when_small_and_memory_is_plentiful():
    p = T.plan_decode(req(latent_h=64, latent_w=64, free_bytes=24 * GiB))       # 512x512: ~1.1 GiB
    assert not p.tiled and p.batch_chunk == 1 and "fits" in p.reason


def test_auto_tiles_when_free_memory_is_small():
    r = req(free_bytes=2 * GiB)                                                  # 1024x1024, 2 GiB free
    p = T.plan_decode(r)
    usable = 2 * GiB * 0.85 - FLUX_WEIGHTS
    assert p.tiled and p.est_call_bytes <= usable
    assert "exceeds" in p.reason and p.device == "gpu"
    # as few tiles as the largest fitting tile needs (then balanced: 2 x 68 instead of 76 + 60)
    side = T.tile_side_for(usable, FLUX_BPP, 8)
    assert FLUX_BPP * ((side + 1) * 8) ** 2 > usable >= FLUX_BPP * (side * 8) ** 2
    assert len(p.xs) == len(p.ys) == -(-(128 - 8) // (side - 8)) == 2 and p.tile_hw == (68, 68)


def test_auto_caps_the_working_set_even_with_a_huge_gpu():
    p = T.plan_decode(req(free_bytes=80 * GiB))                                  # 1024x1024 on an H100
    assert p.tiled and p.n_tiles == 4 and p.tile_hw == (68, 68)                  # 2x2 tiles of 544 px
    assert p.est_call_bytes + FLUX_WEIGHTS < 2.5 * GiB
    # extra compute from the overlap: 4 * 68^2 / 128^2 = 1.13x
    assert p.n_tiles * 68 * 68 / 128 ** 2 < 1.15


def test_2048_at_a_4_gib_budget_fits():
    p = T.plan_decode(req(latent_h=256, latent_w=256, free_bytes=4 * GiB))
    assert p.tiled and p.est_call_bytes + FLUX_WEIGHTS <= 4 * GiB * 0.85


def test_batches_are_grouped_when_they_fit():
    p = T.plan_decode(req(batch=5, latent_h=32, latent_w=32, free_bytes=24 * GiB))
    assert not p.tiled and p.batch_chunk == 5 and p.calls(5) == 1
    p = T.plan_decode(req(batch=5, latent_h=32, latent_w=32, free_bytes=int(0.9 * GiB)))
    assert 1 <= p.batch_chunk < 5 and p.est_call_bytes <= 0.9 * GiB * 0.85


def test_never_and_always_and_a_set_tile_size():
    assert not T.plan_decode(req(mode="never", free_bytes=1 * GiB)).tiled
    small = T.plan_decode(req(mode="always", latent_h=32, latent_w=32))
    assert not small.tiled                               # 256 px fits one 512-px tile
    p = T.plan_decode(req(mode="always"))
    assert p.tiled and max(p.tile_hw) <= 512 // 8
    p = T.plan_decode(req(mode="auto", tile_px=256, free_bytes=1 * GiB))
    assert p.tiled and max(p.tile_hw) <= 32 and "as set" in p.reason
    # overlap is limited to a quarter of the tile
    p = T.plan_decode(req(mode="always", tile_px=128, overlap_px=512))
    assert all(b0 - a1 <= 16 // 4 + 1 for (_, b0), (a1, _) in zip(p.xs, p.xs[1:]))


def test_non_square_images_use_the_area_the_short_side_leaves():
    p = T.plan_decode(req(latent_h=32, latent_w=512, free_bytes=2 * GiB))
    th, tw = p.tile_hw
    assert th == 32 and tw > 64 and len(p.ys) == 1


@pytest.mark.parametrize("bad,match", [(dict(batch=0), "empty"), (dict(mode="sometimes"), "not one of"),
                                       (dict(tile_px=-1), ">= 0")])
def test_bad_requests_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        req(**bad)


def test_policy_is_validated():
    with pytest.raises(ValueError, match="safety"):
        T.TilingPolicy(safety=1.5)
    with pytest.raises(ValueError, match="cap_headroom"):
        T.TilingPolicy(cap_headroom=0.5)


def test_allocator_limit_follows_the_plan():
    # The cap the node holds the CUDA allocator to during the decode: what is reserved already, the image
    # buffer, the plan's estimate with headroom, and some slack; larger plans get a larger cap.
    small = T.plan_decode(req(free_bytes=2 * GiB))
    big = T.plan_decode(req(mode="never"))
    image = 3 * 1024 * 1024 * 4
    lim_small, lim_big = (T.allocator_limit(5 * GiB, p, image) for p in (small, big))
    assert lim_small == 5 * GiB + image + int(small.est_call_bytes * 1.25) + (256 << 20)
    assert lim_big > lim_small and lim_small - 5 * GiB < 2.5 * GiB      # 1024x1024 tiles: < 2.5 GiB above
    assert T.allocator_limit(5 * GiB, small, image, T.TilingPolicy(cap_headroom=None)) is None


# ---- running: OOM fallbacks, cancel, progress ------------------------------------------------------------
OOM = T.OOM_ERRORS[0]


class OOMAbove:
    """A decoder that runs out of memory for calls larger than `limit` latent pixels (on the GPU)."""

    def __init__(self, limit, gpu_always_fails=False):
        self.dec, self.limit, self.fail_all = LocalDecoder(), limit, gpu_always_fails
        self.where = []

    def __call__(self, z, where):
        self.where.append(where)
        if where == "gpu" and (self.fail_all or z.shape[0] * z.shape[2] * z.shape[3] > self.limit):
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.dec(z)


def run(r, fake, **kw):
    warnings, events = [], []
    hooks = T.Hooks(decode=fake, warn=warnings.append, on_oom=lambda: events.append("empty_cache"),
                    to_cpu=lambda: events.append("to_cpu"), **kw)
    with torch.no_grad():
        out, plan = T.run_decode(torch.randn(r.batch, 4, r.latent_h, r.latent_w), T.plan_decode(r), r, hooks)
    return out, plan, warnings, events


def test_oom_retries_with_smaller_tiles():
    r = req(batch=2, latent_h=32, latent_w=32, free_bytes=24 * GiB)
    fake = OOMAbove(limit=20 * 20)
    out, plan, warnings, events = run(r, fake)
    assert out.shape == (2, 3, 256, 256) and plan.device == "gpu"
    assert plan.tiled and plan.batch_chunk == 1 and max(plan.tile_hw) <= 20
    assert len(warnings) == len([e for e in events if e == "empty_cache"]) >= 2
    assert all("ran out of device memory" in w and "retrying" in w for w in warnings)
    assert "to_cpu" not in events


def test_oom_at_the_smallest_tile_falls_back_to_the_cpu():
    r = req(latent_h=24, latent_w=24, free_bytes=24 * GiB)
    fake = OOMAbove(limit=0, gpu_always_fails=True)
    out, plan, warnings, events = run(r, fake)
    assert plan.device == "cpu" and events.count("to_cpu") == 1
    assert "CPU" in warnings[-1] and fake.where[-1] == "cpu"
    assert out.shape == (1, 3, 192, 192)
    with torch.no_grad():        # the CPU result is the real decode (tiled, within the exactness bound)
        assert out.isfinite().all()


def test_never_goes_straight_to_the_cpu_and_a_cpu_device_gives_a_clear_error():
    r = req(latent_h=16, latent_w=16, mode="never")
    out, plan, warnings, events = run(r, OOMAbove(limit=0, gpu_always_fails=True))
    assert plan.device == "cpu" and not plan.tiled and len(warnings) == 1
    with pytest.raises(MemoryError, match="smaller image"):
        run(r, OOMAbove(limit=0, gpu_always_fails=True), cpu_allowed=False)


def test_cancel_between_tiles_and_progress():
    r = req(latent_h=32, latent_w=32, mode="always", tile_px=128, overlap_px=16)
    seen, calls = [], []

    class Cancelled(Exception):
        pass

    def check():
        if len(calls) == 3:
            raise Cancelled()

    def fake(z, where):
        calls.append(z.shape)
        return LocalDecoder()(z)

    hooks = T.Hooks(decode=fake, check_interrupt=check, progress=lambda d, t: seen.append((d, t)))
    with pytest.raises(Cancelled), torch.no_grad():
        T.run_decode(torch.randn(1, 4, 32, 32), T.plan_decode(r), r, hooks)
    total = T.plan_decode(r).calls(1)
    assert total > 3 and seen == [(0, total), (1, total), (2, total), (3, total)]


def test_a_decoder_with_another_upscale_is_reported():
    r = req(latent_h=8, latent_w=8, mode="never")
    hooks = T.Hooks(decode=lambda z, where: torch.zeros(z.shape[0], 3, 32, 32))
    with pytest.raises(RuntimeError, match="expected \\(64, 64\\)"):
        T.run_decode(torch.randn(1, 4, 8, 8), T.plan_decode(r), r, hooks)
