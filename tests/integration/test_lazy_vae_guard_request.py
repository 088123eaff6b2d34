"""LazyVAEDecode inside a guarded prompt (ComfyUI 0.3.75 in-process on the CPU, the tiny synthetic Flux AE):
the decode is the guard's "decoding" stage, follows its request for tiles and says so in the log and the
report.

On a GPU the guard's pre-flight leaves its request on the run (`GuardRun.decode`); on the CPU it asks for
nothing, so these tests leave there the request a GPU run would. The tolerances are those of the tiled
decode in test_lazy_vae_and_attention.py (random weights decode to noise, which shows seams the most).
"""
from __future__ import annotations

import importlib
import logging
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.comfy
GiB, MiB = 1 << 30, 1 << 20
WHY = ("predicted peak 9.10 GiB vs 7.50 GiB usable: does not fit, so VRAMGuard changed: tiled VAE decode at "
       "128 px; now predicted 7.20 GiB.")


@pytest.fixture(scope="module")
def pack(comfy):
    from harness.pack_import import import_pack

    import_pack()
    return SimpleNamespace(**{n: importlib.import_module(f"lowvram_kit.nodes.{m}") for n, m in (
        ("vae", "_vae_comfy"), ("tiling", "_tiling"), ("node", "lazy_vae_decode"), ("guard", "comfy_vram_guard"),
        ("run", "_vram_run"), ("policy", "_vram_policy"), ("registry", "_vram_registry"),
        ("report", "_vram_report"))})


@pytest.fixture(scope="module")
def flux_ae(comfy, tiny_model):
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny_model("flux-ae"))))


@pytest.fixture
def guard_run(pack, tmp_path):
    """guard_run(ask) -> a GuardRun after its sampling, holding `ask` as its decode request."""
    import folder_paths

    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    runs = []

    def start(ask):
        session = pack.guard.GuardSession(pack.policy.GuardSettings(0, GiB // 2, "adapt", 2, True))
        run = session.run = pack.run.GuardRun(session, torch.device("cpu"), {"model": "test"})
        run.decode = ask
        run.after_sampling()            # as after a sampling: the report waits TAIL_S (10 s) for a decode
        runs.append(run)
        return run
    yield start
    for run in runs:
        run.finish("error")             # a no-op for a run the decode finished
    folder_paths.set_output_directory(old)
    assert pack.registry.active() is None


def latent(h, w, seed=0):
    return {"samples": torch.randn((1, 16, h, w), generator=torch.Generator().manual_seed(seed))}


def test_auto_tiles_at_the_requested_size_and_matches_the_untiled_decode(pack, flux_ae, guard_run, caplog):
    s = latent(16, 24, seed=3)                                        # 128x192 px
    with torch.no_grad():
        ref = flux_ae.decode(s["samples"]).float()
    run = guard_run(pack.registry.DecodeRequest(128, 8 * GiB, WHY))
    with caplog.at_level(logging.INFO, logger="lowvram"):
        (image,) = pack.node.LazyVAEDecode().decode(s, flux_ae, "auto", 0, 64, True)
    # unguarded, auto decodes this whole; asked for 128 px: 2 tiles of 16x14 latent px, 4 of them shared
    # (the overlap is held to a quarter of the tile), as in the tiled test of test_lazy_vae_and_attention.py
    assert f"LowVRAM Kit: LazyVAEDecode tiles at 128 px because VRAMGuard asked: {WHY}" in caplog.messages
    err = (image - ref).abs()
    assert image.shape == ref.shape == (1, 128, 192, 3)
    assert float(err.mean()) < 0.05 and float(err.max()) < 0.4
    assert float(err.max()) > 0                                       # it was tiled: not bit-equal
    rep = run.report                                                  # the decode's end finished the run
    assert rep is not None and rep["status"] == "finished" and pack.registry.active() is None
    (event,) = [e for e in rep["events"] if e["kind"] == "decode"]
    assert event["tile_px"] == 128 and event["asked_tile_px"] == 128 and event["plan"].startswith("2 tiles")
    assert "decode: tile_px 128, asked_tile_px 128, plan 2 tiles" in pack.report.report_text(rep)
    stages = [st["name"] for st in rep["memory"]["stages"]]
    assert stages == ["after sampling", "decoding"], stages          # marked once: not counted twice


def test_never_decodes_whole_and_warns_that_the_guard_asked(pack, flux_ae, guard_run, caplog):
    s = latent(8, 16, seed=1)
    with torch.no_grad():
        ref = flux_ae.decode(s["samples"]).float()
    run = guard_run(pack.registry.DecodeRequest(64, 8 * GiB, WHY))
    with caplog.at_level(logging.WARNING, logger="lowvram"):
        (image,) = pack.node.LazyVAEDecode().decode(s, flux_ae, "never", 0, 64, True)
    assert torch.equal(image, ref)
    (warning,) = [m for m in caplog.messages if "VRAMGuard asked" in m]
    assert "tiling=never" in warning and "at most 64 px" in warning
    (event,) = [e for e in run.report["events"] if e["kind"] == "decode"]
    assert event["tile_px"] == 0 and event["asked_tile_px"] == 64


# ---- the plan the node builds from ComfyUI's numbers and the request (no decode) --------------------------
def plan(pack, flux_ae, s, ask, **settings):
    req = pack.vae.build_request(flux_ae, s["samples"], pack.vae.DecodeSettings(**settings), ask)
    return pack.tiling.plan_decode(req)


def test_always_uses_the_smaller_of_the_users_tile_and_the_request(pack, flux_ae):
    s = latent(24, 24)
    for tile_size, asked, largest in ((64, 128, 64), (256, 128, 128), (0, 128, 128)):
        p = plan(pack, flux_ae, s, pack.registry.DecodeRequest(asked, 8 * GiB, WHY), tiling="always",
                 tile_size=tile_size, overlap=32)
        assert p.tiled and largest // 2 < max(p.tile_hw) * 8 <= largest, (tile_size, p.describe())


def test_the_guards_byte_cap_limits_the_plan_without_a_tile_request(pack, flux_ae):
    s = latent(32, 32)                       # 256 px: ~0.5 GiB in fp32 on the CPU, whole when unguarded
    assert not plan(pack, flux_ae, s, None).tiled
    p = plan(pack, flux_ae, s, pack.registry.DecodeRequest(0, 256 * MiB, ""))
    assert p.tiled and p.est_call_bytes <= 256 * MiB * 0.85


def test_a_timeline_started_with_the_prompt_marks_the_decode_and_asks_nothing(pack, flux_ae):
    pack.run.prompt_started("41", True)                  # what VRAMGuard.IS_CHANGED does at prompt start
    pending = pack.run._pending["41"]
    try:
        assert pack.registry.active() is pending and pack.registry.decode_request() is None
        _image, plan = pack.vae.decode_lazily(flux_ae, latent(8, 8), pack.vae.DecodeSettings())
        assert not plan.tiled and pack.registry.active() is pending
    finally:
        pack.run.discard_pending("41", pending)
    names = [st.name for st in pending.monitor.result.stages]
    assert names == [pack.run.BEFORE, "decoding", pack.run.BEFORE], names


def test_the_allocator_cap_restores_a_fraction_the_setter_accepts(pack):
    # torch 2.11 reports "no limit" as ~1.2e8 (SIZE_MAX / device memory); restoring that raised on the GPU.
    import doctest

    assert doctest.testmod(pack.vae).failed == 0
    assert pack.vae.settable_fraction(122888273.8) == 1.0 and pack.vae.settable_fraction(0.0) == 1.0
    assert pack.vae.settable_fraction(0.5) == 0.5
