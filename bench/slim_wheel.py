"""Cut a binary wheel down to the native libraries one machine needs, for the lent GPU's bundle.

The lent GPU machine cannot reach the package registry, and what travels with the checkout is limited to
64 MiB (`.device/`, about 49 MB with ComfyUI). bitsandbytes' wheel is 43 MB because it carries a library
for every CUDA, ROCm and XPU version; the GPU image needs one. This keeps the libraries named by --keep
(plus everything that is not a native library) and drops the rest, RECORD included:

    python -m bench.slim_wheel bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl \\
        --keep 'libbitsandbytes_cpu.so,libbitsandbytes_cuda12[8].so,libbitsandbytes_cuda13[02].so' --out .device/whl

The result keeps the wheel's file name, so pip installs it as the same version. Only for the bench machine:
never ship a cut-down wheel to users.
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
import zipfile
from pathlib import Path

NATIVE_SUFFIXES = (".so", ".dll", ".dylib")


def is_native(name: str) -> bool:
    return name.endswith(NATIVE_SUFFIXES) or ".so." in name


def slim(wheel: Path, keep: list[str], out_dir: Path) -> tuple[Path, list[str]]:
    """Write `out_dir/<wheel name>` without the native libraries that match none of `keep` (fnmatch
    patterns on the file's base name); returns the new path and the names dropped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel.name
    if target.resolve() == wheel.resolve():
        raise ValueError(f"--out {out_dir} would overwrite the input wheel; choose another folder")
    dropped: list[str] = []
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if is_native(name) and not any(fnmatch.fnmatch(base, k) for k in keep):
                dropped.append(name)
        kept_native = [n for n in names if is_native(n) and n not in dropped]
        if not kept_native:
            raise ValueError(f"--keep {keep} matches none of the native libraries of {wheel.name}: "
                             + ", ".join(sorted(n.rsplit('/', 1)[-1] for n in names if is_native(n))))
        gone = set(dropped)
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename in gone:
                    continue
                data = src.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = ("\n".join(line for line in lines if line.split(",", 1)[0] not in gone) + "\n").encode()
                dst.writestr(info, data)
    return target, dropped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.slim_wheel", description=__doc__.split("\n")[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("--keep", required=True, help="comma list of fnmatch patterns of native libraries to keep")
    ap.add_argument("--out", type=Path, required=True, help="folder for the cut-down wheel")
    a = ap.parse_args(argv)
    try:
        target, dropped = slim(a.wheel, [k.strip() for k in a.keep.split(",") if k.strip()], a.out)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB; {len(dropped)} libraries dropped, "
          f"from {a.wheel.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
