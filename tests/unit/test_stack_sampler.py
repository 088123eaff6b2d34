"""bench.stack_sampler's report: prompts found as bursts between idle waits, call trees folded, figures truncated."""
import threading
import time

from bench import stack_sampler as S

IDLE = "threading.py:_bootstrap;main.py:prompt_worker;execution.py:get;threading.py:wait"
WORK = "threading.py:_bootstrap;main.py:prompt_worker;execution.py:execute;nodes.py:sample"


def write(path, lines):
    path.write_text("".join(f"{t:.4f}\t{stack}\n" for t, stack in lines))


def test_bursts_are_busy_runs_between_idle_waits(tmp_path):
    lines = [(0.00 + i * 0.01, IDLE) for i in range(5)]
    lines += [(1.00 + i * 0.01, WORK + ";model.py:forward") for i in range(60)]
    lines += [(1.60 + i * 0.01, WORK + ";packing.py:fill") for i in range(40)]
    lines += [(3.00 + i * 0.01, IDLE) for i in range(5)]
    lines += [(5.00 + i * 0.01, WORK + ";model.py:forward") for i in range(30)]
    path = tmp_path / "s.tsv"
    write(path, lines)
    with open(path, "a") as f:
        f.write("9.00")                                # the last line, torn by the kill: skipped
    samples = S.read_samples(path)
    found = S.bursts(samples)
    assert [len(b) for b in found] == [100, 30]
    text = S.report(path, min_share=0.05)
    # The chain down to nodes.py:sample carries every sample of burst 0: one folded line, then its two children.
    assert "--- burst 0: 0.99 s, 100 samples" in text
    assert "threading.py:_bootstrap > main.py:prompt_worker > execution.py:execute > nodes.py:sample" in text
    assert "0.59 s  60.0%  model.py:forward" in text          # 60/100 of 0.99 s = 0.594: truncated
    assert "0.39 s  40.0%  packing.py:fill" in text
    assert "--- burst 1: 0.29 s" in text


def test_the_sampler_records_the_named_thread(tmp_path):
    out = tmp_path / "live.tsv"
    done = threading.Event()

    def prompt_worker():
        while not done.is_set():
            sum(range(1000))

    worker = threading.Thread(target=prompt_worker, name="Thread-1 (prompt_worker)", daemon=True)
    worker.start()
    threading.Thread(target=S._sample_forever, args=(out, 0.002, S.WORKER_THREAD), daemon=True).start()
    time.sleep(0.8)
    done.set()
    worker.join()
    samples = S.read_samples(out)
    assert samples and all("test_stack_sampler.py:prompt_worker" in stack for _, stack in samples)
