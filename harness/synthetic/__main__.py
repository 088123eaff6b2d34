"""CLI: python -m harness.synthetic list | write NAME [NAME...] [--size tiny|full] [--models-dir DIR]
[--device auto|cpu|cuda] [--seed N]

Exit status 2 for an unknown name (the message lists the known ones) or a full-size write on the CPU
without --allow-cpu-full."""
from __future__ import annotations

import argparse
import sys
import time

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
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except UnknownModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
