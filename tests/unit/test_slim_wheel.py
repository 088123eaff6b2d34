"""bench/slim_wheel: a wheel cut down to the native libraries one machine needs, RECORD consistent."""
import zipfile

import pytest

from bench.slim_wheel import main, slim

FILES = {
    "pkg/__init__.py": b"x = 1\n",
    "pkg/libpkg_cpu.so": b"\x7fELF cpu",
    "pkg/libpkg_cuda128.so": b"\x7fELF 128",
    "pkg/libpkg_cuda130.so": b"\x7fELF 130",
    "pkg/libpkg_rocm64.so": b"\x7fELF rocm",
}


def make_wheel(folder):
    path = folder / "pkg-1.0-py3-none-any.whl"
    record = "".join(f"{n},sha256=x,{len(b)}\n" for n, b in FILES.items()) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in FILES.items():
            z.writestr(name, data)
        z.writestr("pkg-1.0.dist-info/RECORD", record)
    return path


def test_keeps_the_named_libraries_and_everything_else(tmp_path):
    wheel = make_wheel(tmp_path)
    target, dropped = slim(wheel, ["libpkg_cpu.so", "libpkg_cuda13?.so"], tmp_path / "out")
    assert target.name == wheel.name and sorted(dropped) == ["pkg/libpkg_cuda128.so", "pkg/libpkg_rocm64.so"]
    with zipfile.ZipFile(target) as z:
        names = set(z.namelist())
        record = z.read("pkg-1.0.dist-info/RECORD").decode()
        assert z.read("pkg/libpkg_cuda130.so") == FILES["pkg/libpkg_cuda130.so"]
    assert names == {"pkg/__init__.py", "pkg/libpkg_cpu.so", "pkg/libpkg_cuda130.so", "pkg-1.0.dist-info/RECORD"}
    assert "cuda128" not in record and "rocm64" not in record and "pkg/libpkg_cpu.so" in record


def test_refuses_to_keep_nothing_or_to_overwrite_its_input(tmp_path, capsys):
    wheel = make_wheel(tmp_path)
    assert main([str(wheel), "--keep", "libnothing*.so", "--out", str(tmp_path / "o")]) == 2
    assert "matches none" in capsys.readouterr().err
    with pytest.raises(ValueError, match="overwrite"):
        slim(wheel, ["*.so"], tmp_path)
