"""VRAMGuard's memory sampler, run as a process of its own (by path, `python _memory_sampler_child.py ...`).

Why a process: a sampling thread inside the ComfyUI server takes Python's GIL every 10 ms, and an eager fp8
model whose steps are bound by the host's kernel launches then lost up to half its speed in bursts (NewBie
at 6 GiB on an H200: steps of 0.19-0.25 s among 0.12 s ones with VRAMGuard in the graph, a steady 0.123 s
without it; bench/results/workflows_e2e_nvidia-h200_2026-11-22T1421.json to T1424). Here the sampling has
no GIL in common with the server.

    python _memory_sampler_child.py SOURCE INTERVAL_S OUT_PATH
        SOURCE: nvml:<physical GPU index> (NVML "used") or rss:<pid> (that process's resident host RAM)

Appends one record per reading to OUT_PATH: struct "dq" = (time.monotonic(), bytes), flushed about every
0.1 s; exits when its stdin closes (the parent stops it, or died). Prints "ready" on stderr once it has read
once, or one line saying why it cannot sample (exit status 2). Standard library and pynvml only: it is not
imported as part of the pack.
"""
import os
import struct
import sys
import threading
import time

RECORD = struct.Struct("dq")
FLUSH_S = 0.1


def reader(source: str):
    kind, _, arg = source.partition(":")
    if kind == "nvml":
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(arg))
        return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
    if kind == "rss":
        page = os.sysconf("SC_PAGE_SIZE")
        path = f"/proc/{int(arg)}/statm"

        def rss():
            with open(path) as f:
                return int(f.read().split()[1]) * page
        return rss
    raise ValueError(f"unknown source {source!r} (nvml:<index> or rss:<pid>)")


def main(argv) -> int:
    source, interval_s, out_path = argv[0], float(argv[1]), argv[2]
    try:
        read = reader(source)
        read()
    except Exception as e:  # noqa: BLE001  (any failure is reported to the parent, which falls back)
        print(f"cannot sample {source}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2
    stop = threading.Event()

    def wait_for_eof():
        sys.stdin.buffer.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    print("ready", file=sys.stderr, flush=True)
    pending, last_flush = bytearray(), time.monotonic()
    with open(out_path, "ab") as out:
        while True:
            stopping = stop.wait(interval_s)
            now = time.monotonic()
            try:
                pending += RECORD.pack(now, int(read()))
            except Exception:  # noqa: BLE001  (a failed reading is a gap in the timeline)
                pass
            if stopping or now - last_flush >= FLUSH_S:
                out.write(pending)
                out.flush()
                pending.clear()
                last_flush = now
            if stopping:
                return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
