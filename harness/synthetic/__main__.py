"""CLI: python -m harness.synthetic list | write NAME [NAME...] [--size tiny|full] [--models-dir DIR]
[--device auto|cpu|cuda] [--seed N] | disk [--size tiny|full] [--models-dir DIR] [--scratch-gb N]

Exit status 2 for an unknown name (the message lists the known ones) or a full-size write on the CPU
without --allow-cpu-full; `disk` exits 3 when the files still to write (plus scratch space) do not fit."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .cache import DEFAULT_SEED, default_models_dir, ensure, is_current, model_bytes, model_path
from .registry import REGISTRY, SIZES, UnknownModelError, get


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class _Progress:
    """Prints bytes written every ~5% (only for files over 1 GB)."""

    def __init__(self, name: str):
        self.name, self.next_pct, self.t0 = name, 5, time.monotonic()

    def __call__(self, done: int, total: int):
        if total < 1e9:
            return
        pct = 100 * done / total
        if pct >= self.next_pct or done == total:
            rate = done / max(time.monotonic() - self.t0, 1e-9) / 1e9
            print(f"  {self.name}: {_gb(done)} / {_gb(total)} ({pct:.0f}%, {rate:.2f} GB/s)",
                  file=sys.stderr, flush=True)
            self.next_pct = int(pct // 5) * 5 + 5


def cmd_list(_args) -> int:
    wn = max(len(e.name) for e in REGISTRY.values())
    wf = max(len(e.folder + "/" + e.filename) for e in REGISTRY.values())
    print(f"{'name':<{wn}} {'folder/filename':<{wf}} {'tiny':>10} {'full':>10}  description")
    for e in REGISTRY.values():
        sizes = [_gb(model_bytes(e.name, s)) for s in SIZES]
        print(f"{e.name:<{wn}} {e.folder + '/' + e.filename:<{wf}} {sizes[0]:>10} {sizes[1]:>10}  {e.description}")
    return 0


def _device(arg: str) -> str:
    if arg != "auto":
        return arg
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_write(args) -> int:
    for name in args.names:
        get(name)  # fail before writing anything if any name is unknown
    device = _device(args.device)
    if args.size == "full" and device == "cpu" and not args.allow_cpu_full:
        total = sum(model_bytes(n, "full") for n in args.names)
        print(f"error: full-size files ({_gb(total)}) are generated at ~0.1 GB/s on a CPU; use --device cuda "
              "on a GPU machine, a sparse look-alike (harness.synthetic.write_sparse_model) for shape-only "
              "checks, or pass --allow-cpu-full to write them here anyway", file=sys.stderr)
        return 2
    models_dir = args.models_dir or default_models_dir(args.size)
    for name in args.names:
        path = model_path(name, args.size, models_dir)
        if path.exists() and is_current(path, name, args.size, args.seed):
            print(f"{name}: up to date at {path}")
            continue
        t0 = time.monotonic()
        ensure(name, args.size, models_dir, device=device, seed=args.seed, progress=_Progress(name))
        dt = time.monotonic() - t0
        n = model_bytes(name, args.size)
        print(f"{name}: wrote {path} ({_gb(n)} in {dt:.1f} s, {n / 1e9 / max(dt, 1e-9):.2f} GB/s)")
    return 0


def cmd_disk(args) -> int:
    """Refuse early, with the numbers, when the files not yet written do not fit on the disk.

    A test run that runs out of disk half way fails dozens of tests with ENOSPC in the middle of a write;
    this says instead what is needed and where. Scratch space is for what tests write under the temporary
    directory (quantized copies, LoRAs, 1 + 5 block Flux files: 5.5 GB were under pytest's basetemp after
    a full run, which keeps its last three runs' folders)."""
    models_dir = Path(args.models_dir or default_models_dir(args.size))
    missing = [n for n in REGISTRY if not (model_path(n, args.size, models_dir).exists()
                                           and is_current(model_path(n, args.size, models_dir), n, args.size, args.seed))]
    need_models = sum(model_bytes(n, args.size) for n in missing)
    probe = models_dir
    while not probe.exists():
        probe = probe.parent
    scratch = Path(tempfile.gettempdir())
    need = {probe: need_models}
    need[scratch] = need.get(scratch, 0) + int(args.scratch_gb * 1e9)
    # Two paths on one file system share its free bytes.
    by_device: dict[int, tuple[int, list[Path]]] = {}
    for path, n in need.items():
        dev = path.stat().st_dev
        total, paths = by_device.get(dev, (0, []))
        by_device[dev] = (total + n, paths + [path])
    short = False
    for total, paths in by_device.values():
        free = shutil.disk_usage(paths[0]).free
        where = " and ".join(str(p) for p in paths)
        if total > free:
            short = True
            print(f"error: {where}: {_gb(free)} free, {_gb(total)} needed ({len(missing)} synthetic {args.size} "
                  f"model file(s) not yet written: {_gb(need_models)}; scratch for the tests: {args.scratch_gb:g} GB). "
                  "Free disk space, or set LOWVRAM_SYNTHETIC_DIR / TMPDIR to a disk with room.", file=sys.stderr)
        else:
            print(f"disk: {where}: {_gb(free)} free, {_gb(total)} needed")
    return 3 if short else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.synthetic",
                                 description="Synthetic (random-weight) model files with the real key "
                                             "names, shapes and dtypes, for tests and benchmarks.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="names, sizes and bytes").set_defaults(func=cmd_list)
    w = sub.add_parser("write", help="write (or reuse) model files")
    w.add_argument("names", nargs="+", metavar="NAME")
    w.add_argument("--size", choices=SIZES, default="tiny")
    w.add_argument("--models-dir", default=None,
                   help="ComfyUI-style models dir (default: <repo>/.cache/models/synthetic-<size>)")
    w.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when torch sees a GPU); cuda "
                   "writes Flux-dev's 23.8 GB in seconds")
    w.add_argument("--allow-cpu-full", action="store_true", help="allow --size full on the CPU (slow)")
    w.add_argument("--seed", type=int, default=DEFAULT_SEED)
    w.set_defaults(func=cmd_write)
    d = sub.add_parser("disk", help="check that the files still to write (and scratch space) fit on the disk")
    d.add_argument("--size", choices=SIZES, default="tiny")
    d.add_argument("--models-dir", default=None)
    d.add_argument("--scratch-gb", type=float, default=6.0, help="room kept for files tests write under TMPDIR")
    d.add_argument("--seed", type=int, default=DEFAULT_SEED)
    d.set_defaults(func=cmd_disk)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except UnknownModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
