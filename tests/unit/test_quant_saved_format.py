"""Our fp8 file: the writer against safetensors' own reader, the version check, and atomic saving."""

import errno
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import quant.safetensors_io as st_io
import quant.saved_format as saved
from quant import QuantConfig, QuantFileError, SavedFormatVersionError, SaveError, load_saved, save_atomic, save_quantized


def _state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g).to(torch.float8_e4m3fn),
        "a.weight_scale": torch.rand(64, generator=g),
        "b.weight": torch.randn(16, 32, generator=g).to(torch.float8_e5m2),
        "b.weight_scale": torch.tensor(0.25),
        "b.bias": torch.randn(16, generator=g).to(torch.bfloat16),
        "norm.scale": torch.randn(32, generator=g).half(),
        "steps": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
    }


def _same(a, b):
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_writer_output_is_read_back_exactly_by_safetensors(tmp_path):
    sd = _state_dict()
    path = tmp_path / "x.safetensors"
    save_atomic(sd, str(path), {"k": "v"})
    back = load_file(str(path))
    assert set(back) == set(sd) and all(_same(back[k], v) for k, v in sd.items())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}


def test_save_quantized_and_load_saved_round_trip(tmp_path):
    sd, cfg = _state_dict(), QuantConfig(fmt="e5m2", granularity="per_tensor")
    path = str(tmp_path / "own.safetensors")
    save_quantized(sd, path, cfg, source="src")
    back, back_cfg, meta = load_saved(path)
    assert back_cfg == cfg and meta["lowvram.format"] == "fp8-scaled" and meta["lowvram.format_version"] == "1"
    assert meta["lowvram.source"] == "src"
    assert all(_same(back[k], v) for k, v in sd.items())


def test_other_format_version_is_refused_with_the_fix(tmp_path):
    path = str(tmp_path / "old.safetensors")
    meta = saved.build_metadata(QuantConfig(), "src") | {"lowvram.format_version": "0"}
    save_atomic(_state_dict(), path, meta)
    with pytest.raises(SavedFormatVersionError, match=r"format version '0'.*reads version '1'.*re-create it from the original"):
        load_saved(path)


def test_a_file_that_is_not_ours_is_refused(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    save_atomic(_state_dict(), path, {})
    with pytest.raises(QuantFileError, match="is not a LowVRAM Kit fp8-scaled file"):
        load_saved(path)


def test_source_fingerprint_names_size_and_mtime(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"12345")
    fp = json.loads(saved.source_fingerprint(str(p)))
    assert fp["name"] == "m.safetensors" and fp["size_bytes"] == 5 and fp["mtime_ns"] > 0


# ---------------------------------------------------------------------------------------------
# atomic save
# ---------------------------------------------------------------------------------------------

def _full_disk_after(monkeypatch, n_chunks):
    real = st_io._write_chunk
    count = {"n": 0}

    def write(fh, data):
        count["n"] += 1
        if count["n"] > n_chunks:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, data)

    monkeypatch.setattr(st_io, "_write_chunk", write)


@pytest.mark.parametrize("n_chunks", [0, 3])
def test_full_disk_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch, n_chunks):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous complete file")
    (tmp_path / "neighbour.txt").write_text("x")
    _full_disk_after(monkeypatch, n_chunks)
    with pytest.raises(SaveError, match="not enough free disk space to save .*model.safetensors") as info:
        save_atomic(_state_dict(), str(path), {})
    assert info.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "neighbour.txt"]
    assert path.read_bytes() == b"previous complete file"


def test_failing_fsync_or_rename_cleans_up(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(saved.os, "fsync", broken)
    with pytest.raises(SaveError, match="could not save"):
        save_atomic(_state_dict(), str(tmp_path / "m.safetensors"), {})
    assert os.listdir(tmp_path) == []


def test_non_os_errors_also_clean_up_and_propagate(tmp_path):
    with pytest.raises(ValueError, match="cannot be stored in safetensors"):
        save_atomic({"c": torch.zeros(2, dtype=torch.complex64)}, str(tmp_path / "m.safetensors"), {})
    assert os.listdir(tmp_path) == []


def test_missing_directory_is_a_clear_save_error(tmp_path):
    with pytest.raises(SaveError, match="could not save"):
        save_atomic(_state_dict(), str(tmp_path / "no" / "m.safetensors"), {})


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_saved_file_gets_normal_permissions(tmp_path):
    path = tmp_path / "m.safetensors"
    save_atomic(_state_dict(), str(path), {})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
