"""Hold GPU memory in a process of its own, so that a workload in another process (a ComfyUI server) sees
only a budget free. `python -m bench.ballast_process --leave-bytes N` allocates everything free but N
(after its own CUDA context), prints "ready <free bytes>" and holds it until its stdin closes.

BallastProcess is the parent's handle; the parent needs no CUDA itself.
"""
from __future__ import annotations

import argparse
import subprocess
import sys


class BallastError(RuntimeError):
    pass


class BallastProcess:
    """Context manager: `with BallastProcess(leave_bytes):` the GPU has about leave_bytes free inside."""

    def __init__(self, leave_bytes: int, python: str = sys.executable, timeout_s: float = 120):
        if leave_bytes <= 0:
            raise BallastError(f"leave_bytes must be > 0, got {leave_bytes}")
        self.leave_bytes, self.python, self.timeout_s = leave_bytes, python, timeout_s
        self.proc: subprocess.Popen | None = None
        self.free_bytes: int | None = None

    def __enter__(self) -> "BallastProcess":
        self.proc = subprocess.Popen([self.python, "-m", "bench.ballast_process", "--leave-bytes", str(self.leave_bytes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("ready "):
            err = self.proc.stderr.read()[-2000:] if self.proc.poll() is not None else ""
            self.__exit__()
            raise BallastError(f"the ballast process did not start: {line!r} {err}")
        self.free_bytes = int(line.split()[1])
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ballast_process")
    ap.add_argument("--leave-bytes", type=int, required=True)
    a = ap.parse_args(argv)
    from .ballast import Ballast

    with Ballast(a.leave_bytes) as ballast:
        print(f"ready {ballast.free_bytes}", flush=True)
        sys.stdin.read()   # hold until the parent closes our stdin (or dies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
