"""Run one prompt on a running ComfyUI server and measure it as a user would feel it.

Wall time from queueing to the server's 'execution_success' event; seconds per stage (harness.progress
stages) from the 'executing' events; s/it of the sampler from its progress events over steps 2..N
(the first step carries one-time work: plans, pinning, kernel compilation); device memory peak per
stage and overall from an NvmlTimeline, as bytes above `base_bytes` (what the GPU held before the
server started, ballast included).
"""
from __future__ import annotations

import statistics
import time
import uuid

from harness.progress import ProgressListener, stage_of
from harness.server import ComfyServer, ServerError

GiB = 2 ** 30
SAMPLER_CLASSES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")


def sampler_ids(api: dict) -> set[str]:
    return {nid for nid, n in api.items() if n["class_type"] in SAMPLER_CLASSES}


def step_marks(events: list[tuple[float, str, dict]], samplers: set[str], prompt_id: str) -> dict[int, float]:
    """Step number -> the time of its first progress report, from one sampler's progress events."""
    marks: dict[int, float] = {}
    for t, kind, data in events:
        if kind == "progress" and str(data.get("node")) in samplers and data.get("prompt_id") in (None, prompt_id):
            marks.setdefault(int(data["value"]), t)   # first report of each step
    return marks


def s_per_it(events: list[tuple[float, str, dict]], samplers: set[str], prompt_id: str) -> tuple[float | None, int]:
    """(mean seconds of steps 2..N, N) from one sampler's progress events; None with fewer than 3 steps."""
    marks = step_marks(events, samplers, prompt_id)
    steps = max(marks, default=0)
    if steps < 3 or 1 not in marks:
        return None, steps
    return (marks[steps] - marks[1]) / (steps - 1), steps


def step_seconds(events: list[tuple[float, str, dict]], samplers: set[str], prompt_id: str) -> list[float]:
    """Seconds of each of steps 2..N (between consecutive progress reports): the mean hides whether a slow
    prompt was slow at every step or stalled once.

    >>> ev = [(t, "progress", {"node": "9", "value": v}) for t, v in ((0.0, 1), (0.5, 2), (0.7, 3), (1.6, 4))]
    >>> [round(s, 3) for s in step_seconds(ev, {"9"}, "p")]
    [0.5, 0.2, 0.9]
    """
    marks = step_marks(events, samplers, prompt_id)
    return [marks[i] - marks[i - 1] for i in sorted(marks) if i - 1 in marks]


def step_clocks(timeline, marks: dict[int, float]) -> dict:
    """Per step 2..N: the mean SM clock (MHz) and board power (W) NVML read during it, and the clock event
    reasons seen over those steps (power cap, thermal...): is a slow step the GPU's doing or the host's?"""
    from .nvml_timeline import CLOCK_REASONS

    mhz, watts, reasons = [], [], set()
    for i in sorted(marks):
        if i - 1 not in marks:
            continue
        samples = timeline.clocks_between(marks[i - 1], marks[i])
        mhz.append(round(statistics.mean(c[1] for c in samples)) if samples else None)
        watts.append(round(statistics.mean(c[2] for c in samples), 1) if samples else None)
        for c in samples:
            reasons.update(name for bit, name in CLOCK_REASONS.items() if c[3] & bit)
    return {"step_sm_mhz": mhz, "step_power_w": watts, "clock_reasons": sorted(reasons)}


def stage_spans(events, api: dict, prompt_id: str, t_end: float) -> list[tuple[str, float, float]]:
    """(stage, start, end) of each node that ran, in order."""
    marks = [(t, d.get("node")) for t, kind, d in events
             if kind == "executing" and d.get("prompt_id") in (None, prompt_id)]
    spans = []
    for (t0, node), (t1, _) in zip(marks, marks[1:] + [(t_end, None)]):
        if node is not None:
            spans.append((stage_of(api.get(str(node), {}).get("class_type", "")), t0, t1))
    return spans


def run_prompt(server: ComfyServer, api: dict, timeline, base_bytes: int | None, timeout_s: float = 900) -> dict:
    """Queue `api`, wait for it, return the measurements (and 'error' instead of raising on a failed prompt)."""
    client = f"bench-{uuid.uuid4().hex[:8]}"
    row: dict = {}
    log_start = _log_size(server)
    with ProgressListener(server.url, client) as listener:
        t0 = time.monotonic()
        prompt_id = server.queue(api, client_id=client)
        try:
            entry = server.wait(prompt_id, timeout_s=timeout_s, poll_s=0.05)
        except ServerError as e:
            entry, row["error"] = None, str(e).splitlines()[0][:600]
        t_done = time.monotonic()
        time.sleep(0.2)  # the last websocket events
        events = list(listener.events)
    ends = [t for t, kind, d in events if kind in ("execution_success", "execution_error", "execution_interrupted")
            and d.get("prompt_id") == prompt_id]
    t_end = min(ends) if ends else t_done
    row["prompt_s"] = t_end - t0
    spans = stage_spans(events, api, prompt_id, t_end)
    stages: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    for stage, a, b in spans:
        stages[stage] = stages.get(stage, 0.0) + (b - a)
        peak = timeline.peak_between(a, b) if timeline is not None else None
        if peak is not None and base_bytes is not None:
            peaks[stage] = max(peaks.get(stage) or 0.0, (peak - base_bytes) / GiB)
    row["stages_s"] = {k: round(v, 3) for k, v in stages.items()}
    row["stage_peak_gib"] = {k: round(v, 3) for k, v in peaks.items()}
    peak = timeline.peak_between(t0, t_end) if timeline is not None else None
    row["peak_gib"] = None if peak is None or base_bytes is None else round((peak - base_bytes) / GiB, 3)
    row["s_per_it"], row["steps"] = s_per_it(events, sampler_ids(api), prompt_id)
    row["step_s"] = [round(x, 4) for x in step_seconds(events, sampler_ids(api), prompt_id)]
    row["s_per_it_median"] = statistics.median(row["step_s"]) if row["step_s"] else None
    if timeline is not None and getattr(timeline, "clocks", None):
        row.update(step_clocks(timeline, step_marks(events, sampler_ids(api), prompt_id)))
    if entry is not None:
        row["images"] = sum(len(o.get("images", [])) for o in entry.get("outputs", {}).values())
    row["pack_log"] = pack_log_lines(server, log_start)
    return row


PACK_LOG_MARK = "LowVRAM Kit"
PACK_LOG_MAX_LINES = 40


def _log_size(server: ComfyServer) -> int:
    path = getattr(server, "log_path", None)
    return path.stat().st_size if path is not None and path.exists() else 0


def pack_log_lines(server: ComfyServer, start: int) -> list[str]:
    """The pack's own log lines written during this prompt (plans, attach times, placements), at most 40."""
    path = getattr(server, "log_path", None)
    if path is None or not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    lines = [line.strip()[:400] for line in text.splitlines() if PACK_LOG_MARK in line]
    return lines[:PACK_LOG_MAX_LINES]
