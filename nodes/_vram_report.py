"""VRAMGuard's report: one dict (saved as JSON beside the outputs), a few lines of text (UI and server
log), and a timeline PNG drawn with Pillow (memory over time, stages shaded, budget and prediction).

    rep = build_report(result=monitor_result, decision=d, events=[...], meta={...})
    text = report_text(rep)
    paths = save_report(rep, out_dir)      # {"json": Path, "png": Path or None}
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

log = logging.getLogger("lowvram")
GiB = 1 << 30
REPORT_VERSION = 1
PLOT_W, PLOT_H, MARGIN = 900, 320, 56
STAGE_COLOURS = [(214, 232, 250), (253, 226, 200), (214, 240, 214), (240, 214, 240), (240, 240, 200)]


def _gib(n) -> float | None:
    return None if n is None else round(n / GiB, 3)


def build_report(result, decision=None, events=(), meta: dict | None = None, status: str = "finished",
                 timings=()) -> dict:
    """A JSON-able dict. `result`: a MonitorResult (or None); `decision`: a policy Decision (or None);
    `events`: dicts such as {"kind": "oom", "attempt": 1, "change": "..."}; `meta`: model, device, ...;
    `timings`: where the sampling stage's time went ({"what": "model loaded", "seconds": 1.2, ...})."""
    rep = {"version": REPORT_VERSION, "status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           **(meta or {}), "events": list(events), "timings": list(timings)}
    if decision is not None:
        rep["decision"] = {
            "verdict": decision.verdict, "messages": list(decision.messages), "plan": _plain(decision.plan),
            "usable_gib": _gib(decision.usable_bytes),
            "predicted_peak_gib": _gib(decision.estimate.peak_bytes),
            "predicted_sampling_gib": _gib(decision.estimate.sampling_bytes),
            "predicted_decode_gib": _gib(decision.estimate.decode_bytes),
            "predicted_components_gib": {k: _gib(v) for k, v in decision.estimate.components.items()},
            "first_predicted_peak_gib": _gib(decision.first_estimate.peak_bytes),
            "rough": decision.estimate.rough}
    if result is not None:
        rep["memory"] = {
            "source": result.source, "note": result.note, "interval_ms": result.interval_s * 1e3,
            "samples": len(result.used_bytes), "read_errors": result.read_errors,
            "baseline_gib": _gib(result.baseline_bytes), "peak_gib": _gib(result.peak_bytes),
            "peak_above_baseline_gib": _gib(result.peak_above_baseline), "end_gib": _gib(result.end_bytes),
            "duration_s": round(result.duration_s, 3),
            "stages": [{"name": s.name, "seconds": round(s.seconds, 3), "peak_gib": _gib(s.peak_bytes),
                        "peak_above_baseline_gib": _gib(max(0, s.peak_bytes - result.baseline_bytes))}
                       for s in result.stages]}
    return rep


def _plain(x):
    return asdict(x) if is_dataclass(x) else x


def report_text(rep: dict) -> str:
    lines = [f"VRAMGuard ({rep.get('status')}): {rep.get('model', 'model')} on {rep.get('device', '?')}"]
    d = rep.get("decision")
    if d:
        lines.append(f"plan: {d['verdict']}; " + " ".join(d["messages"]))
    for e in rep.get("events", []):
        lines.append(f"{e.get('kind')}: " + ", ".join(f"{k} {v}" for k, v in e.items() if k != "kind"))
    m = rep.get("memory")
    if m:
        lines.append(f"measured peak {m['peak_above_baseline_gib']:.2f} GiB above the {m['baseline_gib']:.2f} GiB "
                     f"in use at the start ({m['source']}, {m['samples']} samples every {m['interval_ms']:g} ms)"
                     + (f"; predicted {d['predicted_peak_gib']:.2f} GiB" if d else ""))
        for s in m["stages"]:
            lines.append(f"  {s['name']}: {s['seconds']:.2f} s, peak +{s['peak_above_baseline_gib']:.2f} GiB")
        if m["note"]:
            lines.append("note: " + m["note"])
    return "\n".join(lines)


def draw_timeline(rep: dict, result, path: Path, budget_bytes: int | None = None,
                  predicted_bytes: int | None = None) -> Path:
    """Memory (GiB above the start) over time; stages shaded and named; budget (red) and prediction (blue)."""
    from PIL import Image, ImageDraw   # lazy: Pillow ships with ComfyUI

    img = Image.new("RGB", (PLOT_W, PLOT_H), "white")
    g = ImageDraw.Draw(img)
    times, used = result.times_s, [u - result.baseline_bytes for u in result.used_bytes]
    t_max = max(times[-1] if times else 0.0, 1e-3)
    # Scale to what was measured or predicted; a budget far above both would flatten the curve: it is
    # then named in the caption instead of drawn.
    top = max(max(used, default=0), predicted_bytes or 0, GiB // 8) * 1.25
    off_scale = bool(budget_bytes) and budget_bytes > top * 2
    if budget_bytes and not off_scale:
        top = max(top, budget_bytes * 1.1)
    x0, y0, x1, y1 = MARGIN, 20, PLOT_W - 16, PLOT_H - 36

    def xy(t, b):
        return x0 + (x1 - x0) * t / t_max, y1 - (y1 - y0) * b / top

    row = 0
    for i, s in enumerate(result.stages):
        a, _ = xy(s.start_s, 0)
        b, _ = xy(s.end_s, 0)
        g.rectangle([a, y0, max(a + 1, b), y1], fill=STAGE_COLOURS[i % len(STAGE_COLOURS)])
        if b - a >= 6:      # names of very short stages would only overprint their neighbours'
            name = s.name if g.textlength(s.name) <= max(b - a, 90) else s.name[: max(3, int((b - a) / 6))]
            g.text((a + 3, y0 + 3 + 12 * (row % 3)), name, fill="black")
            row += 1
    g.rectangle([x0, y0, x1, y1], outline="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = xy(0, top * frac / 1.1)
        g.text((4, y - 6), f"{top * frac / 1.1 / GiB:.{2 if top < 4 * GiB else 1}f}", fill="black")
    caption = f"0 s ... {t_max:.1f} s; GiB above the start ({result.source}); black: measured, blue: predicted peak"
    caption += f"; usable budget {budget_bytes / GiB:.1f} GiB (off the scale)" if off_scale else "; red: usable budget"
    g.text((x0, PLOT_H - 18), caption, fill="black")
    for level, colour in ((None if off_scale else budget_bytes, (200, 0, 0)), (predicted_bytes, (0, 0, 200))):
        if level:
            _, y = xy(0, level)
            g.line([x0, y, x1, y], fill=colour, width=1)
    points = _decimate([xy(t, u) for t, u in zip(times, used)], x1 - x0)
    if len(points) > 1:
        g.line(points, fill=(0, 0, 0), width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _decimate(points, width: int):
    """At most ~2 points per pixel column: the min and max of each column keep every peak visible."""
    if len(points) <= 2 * width:
        return points
    cols: dict[int, list] = {}
    for x, y in points:
        cols.setdefault(int(x), []).append((x, y))
    out = []
    for c in sorted(cols):
        pts = cols[c]
        lo, hi = min(pts, key=lambda p: p[1]), max(pts, key=lambda p: p[1])
        out += sorted({lo, hi})
    return out


def save_report(rep: dict, out_dir: str | os.PathLike, result=None, budget_bytes=None, predicted_bytes=None,
                stem: str | None = None) -> dict:
    """Write <stem>.json (and <stem>.png when there is a timeline) atomically; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or time.strftime("vramguard_%Y%m%d-%H%M%S")
    paths = {"json": out / f"{stem}.json", "png": None}
    if result is not None and len(result.times_s) > 0:
        try:
            paths["png"] = draw_timeline(rep, result, out / f"{stem}.png", budget_bytes, predicted_bytes)
            rep["timeline_png"] = paths["png"].name
        except (ImportError, OSError, ValueError) as e:
            log.warning("LowVRAM Kit VRAMGuard: the timeline plot was not drawn (%s: %s)", type(e).__name__, e)
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rep, indent=1) + "\n")
    os.replace(tmp, paths["json"])
    return paths
