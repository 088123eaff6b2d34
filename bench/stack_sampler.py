"""Where a ComfyUI server's prompt worker spends its time: a sampling profiler run inside the server process.

    python -m bench.stack_sampler --out stacks.tsv -- /path/to/ComfyUI/main.py --listen ...   # what
        ServerConfig(launcher=stack_sampler.launcher(path)) starts instead of `python main.py ...`
    python -m bench.stack_sampler --report stacks.tsv [--min-share 0.02]                     # the call trees

cProfile sees only the thread that started it, and ComfyUI runs prompts in its `prompt_worker` thread; py-spy is
not on the lent GPU machine. So a daemon thread reads that thread's Python stack (sys._current_frames) every
few milliseconds and appends one line per sample: "<time.monotonic()>\t<frame>;<frame>;..." (outermost
first, each frame "file.py:function"). The report splits the samples into bursts (the worker busy between two
waits for the next prompt: one burst per prompt) and prints, per burst, the call tree of the frames that took
at least --min-share of it, with chains where one child takes (nearly) all of its parent's time folded into
one line. Wall-clock shares: a frame waiting on the GPU (a synchronising copy) counts as much as one computing.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from bench.e2e_table import truncated

WORKER_THREAD = "prompt_worker"        # ComfyUI main.py: threading.Thread(target=prompt_worker, ...)
IDLE_LEAVES = ("queue.py:get", "threading.py:wait", "execution.py:get")   # the worker waiting for a prompt
FOLD_SHARE = 0.97                        # a child with this share of its parent's samples is folded into it
MAX_DEPTH = 120
NOISE = {"module.py:_wrapped_call_impl", "module.py:_call_impl"}   # nn.Module's call plumbing: left out


def launcher(out: Path, interval_ms: float = 5.0) -> tuple[str, ...]:
    """The arguments between `python` and ComfyUI's main.py that run the server under this sampler."""
    return ("-m", "bench.stack_sampler", "--out", str(out), "--interval-ms", str(interval_ms), "--")


def _frame_names(frame) -> list[str]:
    names = []
    while frame is not None and len(names) < MAX_DEPTH:
        code = frame.f_code
        names.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
        frame = frame.f_back
    return names[::-1]


def _sample_forever(out: Path, interval_s: float, thread_name: str) -> None:
    with open(out, "a", buffering=1 << 20) as f:
        last_flush = time.monotonic()
        while True:
            time.sleep(interval_s)
            ident = next((t.ident for t in threading.enumerate() if thread_name in t.name), None)
            frame = sys._current_frames().get(ident) if ident is not None else None
            names = _frame_names(frame) if frame is not None else None
            # Drop the frame now, not at the next sample: held across the sleep, a frame that returned meanwhile
            # kept its locals alive, and they were freed here, in this thread. Tensors of a CUDA graph capture
            # freed from another thread while it ran aborted the server (cudaMallocAsync: "invalid argument" in
            # free_impl; bench/results/workflows_e2e_nvidia-h200_2026-11-22T1717.json, the repeat prompt).
            del frame
            if names is not None:
                f.write(f"{time.monotonic():.4f}\t{';'.join(names)}\n")
            if time.monotonic() - last_flush > 0.5:    # the server is stopped with SIGTERM: no atexit
                f.flush()
                last_flush = time.monotonic()


def run_under_sampler(out: Path, interval_ms: float, script: str, script_args: list[str]) -> None:
    threading.Thread(target=_sample_forever, args=(out, interval_ms / 1000, WORKER_THREAD), daemon=True,
                     name="lowvram-stack-sampler").start()
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


# ---- the report ------------------------------------------------------------------------------------------
def read_samples(path: Path) -> list[tuple[float, tuple[str, ...]]]:
    samples = []
    for line in Path(path).read_text(errors="replace").splitlines():
        t, tab, stack = line.partition("\t")
        if not tab:                 # a line cut short by the kill
            continue
        try:
            samples.append((float(t), tuple(f for f in stack.split(";") if f not in NOISE)))
        except ValueError:          # a torn time field
            continue
    return samples


def bursts(samples, gap_s: float = 0.5) -> list[list[tuple[float, tuple[str, ...]]]]:
    """Busy samples grouped into runs without a gap longer than gap_s (idle samples are dropped)."""
    busy = [s for s in samples if not s[1][-1].endswith(IDLE_LEAVES)]
    out: list[list] = []
    for s in busy:
        if out and s[0] - out[-1][-1][0] <= gap_s:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def call_tree(stacks: list[tuple[str, ...]]) -> dict:
    """{"n": samples, "kids": {frame: subtree}} over all stacks."""
    root: dict = {"n": 0, "kids": {}}
    for stack in stacks:
        node = root
        node["n"] += 1
        for name in stack:
            node = node["kids"].setdefault(name, {"n": 0, "kids": {}})
            node["n"] += 1
    return root


def _secs(x: float) -> str:
    return truncated(x, 2)   # a figure is never rounded up


def tree_lines(node: dict, total: int, seconds: float, min_share: float, indent: int = 0) -> list[str]:
    lines = []
    for name, kid in sorted(node["kids"].items(), key=lambda kv: -kv[1]["n"]):
        if kid["n"] < min_share * total:
            continue
        chain = [name]
        while len(kid["kids"]) >= 1:     # fold a chain where one child carries (nearly) all the time
            big_name, big = max(kid["kids"].items(), key=lambda kv: kv[1]["n"])
            if big["n"] < FOLD_SHARE * kid["n"]:
                break
            chain.append(big_name)
            kid = {"n": kid["n"], "kids": big["kids"]}
        shown = chain if len(chain) <= 4 else [chain[0], "...", *chain[-2:]]
        lines.append(f"{'  ' * indent}{_secs(kid['n'] / total * seconds):>7} s {truncated(100 * kid['n'] / total, 1):>5}%  "
                     f"{' > '.join(shown)}")
        lines += tree_lines(kid, total, seconds, min_share, indent + 1)
    return lines


def report(path: Path, min_share: float = 0.02) -> str:
    samples = read_samples(path)
    out = [f"{path}: {len(samples)} samples"]
    for i, burst in enumerate(bursts(samples)):
        seconds = burst[-1][0] - burst[0][0]
        if seconds < 0.2:
            continue
        out.append(f"--- burst {i}: {_secs(seconds)} s, {len(burst)} samples, t={burst[0][0]:.2f}..{burst[-1][0]:.2f}")
        out += tree_lines(call_tree([s for _, s in burst]), len(burst), seconds, min_share)
        leaves: dict[str, int] = defaultdict(int)
        for _, stack in burst:
            leaves[stack[-1]] += 1
        top = sorted(leaves.items(), key=lambda kv: -kv[1])[:12]
        out.append("  leaves: " + ", ".join(f"{name} {_secs(n / len(burst) * seconds)} s" for name, n in top))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="append samples here and run the script after --")
    p.add_argument("--interval-ms", type=float, default=5.0)
    p.add_argument("--report", type=Path, nargs="*", help="print the call trees of these sample files")
    p.add_argument("--min-share", type=float, default=0.02)
    a = p.parse_args(argv)
    if a.report:
        print("\n\n".join(report(f, a.min_share) for f in a.report))
        return 0
    if a.out is None or not script_args:
        p.error("pass --out FILE -- SCRIPT [ARGS...] to sample, or --report FILE...")
    run_under_sampler(a.out, a.interval_ms, script_args[0], script_args[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
