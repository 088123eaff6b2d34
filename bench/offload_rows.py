"""What the block-streaming benchmarks (bench.offload_flux, bench.offload_families) share: our rows measured
in one process, the floor and ratio of every row, the result file and the closing table.

Floor of a row = max(resident compute, transfer), per step:
- resident compute: the s/it of the row's `resident_mode` (its own mode unless it says otherwise) with every
  weight on the GPU (that mode's unlimited, unstreamed row);
- transfer: bytes copied host->device per pass x passes per step (CFG: 1 when ComfyUI batches cond and
  uncond, 2 when it splits them) / 55.6 GB/s, the anchor machine's pinned bandwidth (benchmarking.md).
  Our rows take the bytes from the streamer's plan; ComfyUI core's rows from what it left unloaded
  (model_gib - loaded_gib: its low-VRAM layers copy those weights in every pass).

    >>> rows = [{"kind": "row", "mode": "comfy", "budget": "unlimited", "budget_gib": None, "s_per_it": 0.1},
    ...         {"kind": "row", "mode": "ours", "budget": "unlimited", "budget_gib": None, "s_per_it": 0.08},
    ...         {"kind": "row", "mode": "ours", "budget": "4", "budget_gib": 4.0, "s_per_it": 0.12,
    ...          "streamed": True, "streamed_bytes": int(5.56e9), "passes_per_step": 1.0}]
    >>> [(round(r["ratio"], 3), round(r["floor_s"], 3), r["floor_bound"]) for r in add_floors(rows, "comfy")]
    [(1.0, 0.1, 'compute'), (0.8, 0.08, 'compute'), (1.2, 0.1, 'transfer')]
"""
from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from .ballast import GiB
from .comfy_core_flux import error_row, import_comfy, sample_once
from .results import host_environment, slug, utc_now, write_json
from .table import format_table
from .workload import Workload, make_inputs

PINNED_H2D = 55.6e9  # bytes/s, the anchor machine's pinned host->device bandwidth (benchmarking.md)
DEVICE_FIELDS = ("device_name", "device_total_bytes", "driver", "cuda", "torch", "compute_capability",
                 "pcie_gen_max", "pcie_width_max", "pcie_gen_current", "pcie_width_current", "nvml_note")


class OursRun:
    """ComfyUI (--cpu for a smoke run) and the pack imported once; rows appended to a JSON-lines file."""

    def __init__(self, rows_path: str | os.PathLike, w: Workload, smoke: bool):
        from .results import device_environment

        _args, self.mm, self.comfy_sample, self.folder_paths, _nodes = import_comfy(
            os.environ["COMFYUI_PATH"], ["--cpu"] if smoke else [])
        from harness.pack_import import import_pack

        import_pack()
        self.streaming = importlib.import_module("lowvram_kit.nodes.comfy_block_streaming")
        self.loading = importlib.import_module("lowvram_kit.nodes.comfy_fp8_loading")
        self.device = self.mm.get_torch_device()
        self.w, self.inputs = w, make_inputs(w)
        self.out = open(rows_path, "a")
        self.emit({"kind": "env", "mode": "ours", **device_environment(self.device), "workload": asdict(w),
                   "vram_state": self.mm.vram_state.name})

    def emit(self, record: dict) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def close(self) -> None:
        self.mm.unload_all_models()
        self.out.close()

    def timed_load(self, what: str, load):
        """load() -> (model, report text or None), timed and recorded as {"kind": "load"}; the model, or None
        (the error recorded) if it raised."""
        t0 = time.perf_counter()
        try:
            model, report = load()
        except Exception as e:  # noqa: BLE001  (the other modes may still load: record, go on)
            self.emit({"kind": "load", "what": what, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"[ours] load {what} FAILED: {type(e).__name__}: {e}", flush=True)
            return None
        self.emit({"kind": "load", "what": what, "seconds": time.perf_counter() - t0, "report": report})
        return model

    def load_fp8(self, path, what: str = "ours_fp8"):
        """Float8DiTLoader's route: per-channel e4m3fn weights, fp8 matmul where the GPU has it."""
        from lowvram_kit.quant import QuantConfig

        cfg = self.loading.Fp8LoadConfig(QuantConfig(compute="fp8"))

        def load():
            model, report = self.loading.load_fp8_model(str(path), cfg)
            return model, report.text()
        return self.timed_load(what, load)

    def load_comfy(self, path, what: str):
        """UNETLoader's route, weight dtype "default" (ComfyUI picks the dtype; a checkpoint: its UNet)."""
        import comfy.sd

        return self.timed_load(what, lambda: (comfy.sd.load_diffusion_model(str(path)), None))

    def row(self, model, mode: str, budget: str, budget_bytes: int = 0, **info) -> dict:
        """One measured row. "unlimited": the model as loaded, all resident (the floor's compute time). A
        budget in GiB: the ballast leaves that much free and ChunkedOffloadUNet streams with its budget on
        auto. `budget_bytes` > 0 (smoke, on the CPU): streams within that many bytes, no ballast."""
        gib = None if budget == "unlimited" else float(budget)
        stream = gib is not None or budget_bytes > 0
        pin = self.device.type == "cuda"  # page-locking needs a CUDA build and device
        session = None
        try:
            if stream:
                settings = self.streaming.StreamingSettings(budget_bytes, 0, 0, pin)
                model, session = self.streaming.stream_blocks(model, settings)
            row = sample_once(model, self.w, self.inputs, gib, self.device, self.mm, self.comfy_sample)
        except Exception as e:  # noqa: BLE001  (one failing row must not cost the rows after it)
            row = error_row(gib, e)
        row.update(kind="row", mode=mode, streamed=stream, **info)
        if budget_bytes:
            row.update(budget=f"{budget_bytes / GiB:.2f}GiB-cpu", stream_budget_bytes=budget_bytes)
        if session is not None and session.streamer is not None:
            plan = session.streamer.plan
            row.update(plan=session.plan_text, streamed_bytes=plan.streamed_bytes,
                       streamed_gib=plan.streamed_bytes / GiB, resident_gib=plan.resident_bytes / GiB,
                       slot_gib=plan.slot_bytes / GiB, copies=session.streamer.copies)
        self.emit(row)
        print(f"[ours] {mode} {row['budget']}: s/it {row.get('s_per_it')}, peak {row.get('peak_gib')}"
              + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)
        return row


def add_floors(rows: list[dict], reference: str) -> list[dict]:
    """ratio (to the `reference` mode's unlimited row), floor_s, floor_bound and their parts, in place."""
    resident = {r["mode"]: r["s_per_it"] for r in rows if r.get("budget_gib") is None
                and not r.get("streamed") and not r.get("repeat") and r.get("s_per_it")}
    ref = resident.get(reference)
    for r in rows:
        s = r.get("s_per_it")
        streamed = r.get("streamed_bytes")
        if streamed is None and not r.get("streamed") and r.get("budget_gib") is not None \
                and r.get("loaded_gib") is not None:
            streamed = max(0, int((r["model_gib"] - r["loaded_gib"]) * GiB))   # ComfyUI core's low-VRAM part
        transfer = None if streamed is None else streamed * (r.get("passes_per_step") or 1) / PINNED_H2D
        compute = resident.get(r.get("resident_mode", r["mode"]))
        parts = {k: v for k, v in (("compute", compute), ("transfer", transfer)) if v is not None}
        bound = max(parts, key=parts.get) if parts else None
        r.update(ratio=s / ref if s and ref else None, floor_compute_s=compute, floor_transfer_s=transfer,
                 floor_s=parts.get(bound), floor_bound=bound,
                 floor_ratio=parts[bound] / ref if bound and ref else None)
    return same_bits(rows)


def same_bits(rows: list[dict]) -> list[dict]:
    """same_bits: whether a budget row's output latent has the bits of its resident mode's unlimited row
    (the same weights and dtypes all on the GPU); issue #4 asks streaming to change none. None: no digest.

    >>> rows = [{"mode": "m", "budget_gib": None, "latent_sha256": "a"}, {"mode": "m", "budget_gib": 4.0,
    ...          "streamed": True, "latent_sha256": "a"}, {"mode": "m", "budget_gib": 6.0, "latent_sha256": "b"}]
    >>> [r.get("same_bits") for r in same_bits(rows)]
    [None, True, False]
    """
    digests = {r["mode"]: r.get("latent_sha256") for r in rows if r.get("budget_gib") is None
               and not r.get("streamed") and not r.get("repeat")}
    for r in rows:
        ref, mine = digests.get(r.get("resident_mode", r["mode"])), r.get("latent_sha256")
        if r.get("budget_gib") is not None or r.get("streamed"):
            r["same_bits"] = None if ref is None or mine is None else mine == ref
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def table(rows: list[dict], label: str = "") -> str:
    headers = ["family", "mode", "budget", "s/it", "ratio", "floor s", "floor ratio", "bound", "H2D GiB/step",
               "passes/step", "peak GiB", "<=budget", "same bits", "error"]
    body = [[r.get("family") or label, r["mode"], r["budget"], r.get("s_per_it"), r.get("ratio"), r.get("floor_s"),
             r.get("floor_ratio"), r.get("floor_bound"),
             None if r.get("floor_transfer_s") is None else r["floor_transfer_s"] * PINNED_H2D / GiB,
             r.get("passes_per_step"), r.get("peak_gib"), r.get("within_budget"), r.get("same_bits"),
             (r.get("error") or "")[:60]]
            for r in rows]
    return format_table(headers, body)


def finish(benchmark: str, rows_file: Path, out_dir: Path, stamp: str, smoke: bool, reference: str,
           info: dict) -> tuple[Path, list[dict]]:
    """Read the rows the processes appended, add ratios and floors, write the result JSON, drop the rows."""
    records = read_jsonl(rows_file)
    rows = add_floors([r for r in records if r.get("kind") == "row"], reference)
    env0 = next((r for r in records if r.get("kind") == "env"), {})
    env = {**host_environment(os.environ.get("COMFYUI_PATH")),
           **{k: v for k, v in env0.items() if k in DEVICE_FIELDS}}
    device = slug(env.get("device_name") or "unknown")
    path = out_dir / f"{benchmark}_{'smoke_' if smoke else ''}{device}_{stamp}.json"
    write_json(path, {"benchmark": benchmark, "smoke": smoke, "finished": utc_now(), "environment": env,
                      "command": env["command"], "reference": reference, "h2d_bytes_per_s": PINNED_H2D,
                      "workload": env0.get("workload"), **info, "rows": rows,
                      "records": [r for r in records if r.get("kind") != "row"]})
    rows_file.unlink(missing_ok=True)
    return path, rows
