"""VRAMGuard's monitor, readers, report and registry (nodes/_vram_monitor.py, _vram_report.py,
_vram_registry.py): sampling at <= 10 ms with stage peaks, the NVML -> torch -> host RAM fallbacks with
their notes, the JSON/text/PNG report, and the no-op registry."""
import json
import sys
import time
import types

import pytest

from harness.pure_nodes import pure_node as pure


M, R, REG = pure("_vram_monitor"), pure("_vram_report"), pure("_vram_registry")
GiB = 1 << 30


class Ramp:
    """A fake device: `level` is what used() returns; thread-safe enough for a test."""

    def __init__(self):
        self.level, self.calls, self.fail_at = 100, 0, set()

    def used(self):
        self.calls += 1
        if self.calls in self.fail_at:
            raise OSError("driver hiccup")
        return self.level


def reader(ramp):
    return M.MemoryReader("fake", ramp.used, lambda: 10 * GiB, 16 * GiB)


def test_interval_must_be_10_ms_or_finer():
    with pytest.raises(ValueError, match="interval_s"):
        M.Monitor(reader(Ramp()), interval_s=0.02)


def test_stages_get_their_own_peaks_and_durations():
    ramp = Ramp()
    mon = M.Monitor(reader(ramp), interval_s=0.002).start()
    with mon.stage("text encoding"):
        ramp.level = 300
        time.sleep(0.05)
        ramp.level = 150
    with mon.stage("sampling"):
        ramp.level = 900
        time.sleep(0.05)
    ramp.level = 120
    mon.mark("decoding")
    time.sleep(0.03)
    res = mon.stop()
    assert [s.name for s in res.stages] == ["text encoding", "sampling", "decoding"]
    te, samp, dec = res.stages
    assert te.peak_bytes == 300 and samp.peak_bytes == 900 and dec.peak_bytes <= 900
    assert all(s.seconds > 0.02 for s in res.stages)
    assert res.baseline_bytes == 100 and res.peak_bytes == 900 and res.end_bytes == 120
    assert res.peak_above_baseline == 800 and len(res.used_bytes) > 20
    assert mon.stop() is res                         # idempotent
    with pytest.raises(RuntimeError, match="runs once"):
        mon.start()


def test_read_errors_leave_gaps_but_do_not_stop_the_monitor():
    ramp = Ramp()
    ramp.fail_at = {3, 4, 5}
    mon = M.Monitor(reader(ramp), interval_s=0.001).start()
    time.sleep(0.03)
    res = mon.stop()
    assert res.read_errors == 3 and len(res.used_bytes) >= 5


def test_decimation_keeps_the_peaks(monkeypatch):
    monkeypatch.setattr(M, "MAX_SAMPLES", 64)
    ramp = Ramp()
    mon = M.Monitor(reader(ramp), interval_s=0.0005).start()
    ramp.level = 5000
    time.sleep(0.005)
    ramp.level = 100
    time.sleep(0.08)
    res = mon.stop()
    assert len(res.used_bytes) < 64 and res.peak_bytes == 5000


def test_host_reader_on_the_cpu():
    import torch
    r = M.MemoryReader.open(torch.device("cpu"))
    assert r.source == "host RAM" and "no GPU" in r.note
    assert r.used() > 10 << 20 and r.free() > 0 and r.total >= r.free()


def test_nvml_failure_falls_back_to_torch_counters_and_says_so(monkeypatch):
    import torch

    class NVMLError(Exception):
        pass

    def init():
        raise NVMLError("Driver Not Loaded")
    fake = types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=init)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=8 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 * GiB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (5 * GiB, 8 * GiB))
    r = M.MemoryReader.open(torch.device("cuda", 0))
    assert r.source == "torch.cuda.memory_reserved" and r.used() == 3 * GiB and r.free() == 5 * GiB
    assert "NVML failed (Driver Not Loaded)" in r.note and "only this process" in r.note


def test_missing_pynvml_is_named(monkeypatch):
    import torch
    monkeypatch.setitem(sys.modules, "pynvml", None)          # import raises ImportError
    assert M.MemoryReader.nvml(torch.device("cuda", 0)) == "pynvml (nvidia-ml-py) is not installed"


def test_nvml_index_follows_cuda_visible_devices(monkeypatch):
    import torch
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert M.nvml_index(torch.device("cuda", 1)) == 1 and M.nvml_index(torch.device("cuda", 0)) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert M.nvml_index(torch.device("cuda", 2)) == 2


def test_report_json_text_and_png(tmp_path):
    from PIL import Image
    ramp = Ramp()
    mon = M.Monitor(reader(ramp), interval_s=0.002).start()
    with mon.stage("sampling"):
        ramp.level = GiB
        time.sleep(0.03)
    res = mon.stop()
    rep = R.build_report(res, None, [{"kind": "oom", "attempt": 1, "change": "batch runs of 2 -> 1 image(s)"}],
                         {"model": "Flux", "device": "cuda:0"})
    text = R.report_text(rep)
    assert "VRAMGuard (finished): Flux on cuda:0" in text and "oom: attempt 1" in text
    assert "sampling:" in text and "measured peak 1.00 GiB" in text
    paths = R.save_report(rep, tmp_path, res, budget_bytes=2 * GiB, predicted_bytes=int(1.2 * GiB), stem="r")
    saved = json.loads(paths["json"].read_text())
    assert saved["memory"]["stages"][0]["name"] == "sampling" and saved["timeline_png"] == "r.png"
    assert saved["memory"]["interval_ms"] == 2.0 and saved["events"][0]["kind"] == "oom"
    with Image.open(paths["png"]) as im:
        assert im.size == (R.PLOT_W, R.PLOT_H)


def test_report_without_a_monitor_still_saves_json(tmp_path):
    paths = R.save_report(R.build_report(None, status="refused"), tmp_path, stem="x")
    assert paths["png"] is None and json.loads(paths["json"].read_text())["status"] == "refused"


def test_registry_is_a_no_op_without_a_guard():
    assert REG.active() is None and REG.decode_request() is None
    with REG.stage("decoding") as run:
        assert run is None


def test_registry_forwards_stages_and_requests_to_the_active_run():
    seen = []

    class Run:
        def begin_stage(self, name):
            seen.append(("begin", name))

        def end_stage(self, name):
            seen.append(("end", name))

        def decode_request(self):
            return REG.DecodeRequest(512, GiB, "because")

    run = Run()
    REG.activate(run)
    try:
        with REG.stage("decoding"):
            assert REG.decode_request().tile_px == 512
        REG.deactivate(object())                    # only the active run may deactivate itself
        assert REG.active() is run
    finally:
        REG.deactivate(run)
    assert seen == [("begin", "decoding"), ("end", "decoding")] and REG.active() is None
