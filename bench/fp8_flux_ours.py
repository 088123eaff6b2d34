"""One process for bench.fp8_flux: our Float8DiTLoader's loads and sampling rows, and ComfyUI's load times.

    COMFYUI_PATH=... python -m bench.fp8_flux_ours --model DIR/flux1-dev.safetensors --rows-out rows.jsonl \
        --latent-dir DIR --work-dir DIR [--modes ...] [--budget-row 12] [--extras fast_accum,compiled] \
        [--load-repeats 2] [--deadline EPOCH] -- [--cpu]

In this order, one model in memory at a time (JSON lines, flushed as measured, so a run cut short keeps
its records):
1. the source file read once (page cache warm for every load below);
2. ComfyUI's plain load of the bf16 file (UNETLoader, weight_dtype default, to the CPU), --load-repeats times;
3. our loader for each of OURS (quantizing on the GPU as the node does), timed, then sampled; the
   per-token model also again (--noise-check) and at --budget-row GiB; then the quantizing load with
   quant.device_quant's helper thread off (results copied out on the main thread), for comparison;
4. a plain fp8 file (every 2-D weight cast, no scales: what ComfyUI's fp8 files are) and ComfyUI's
   UNETLoader on it;
5. our loader writing its quantized copy (timed with the save), then reloading that copy; the last
   reload is sampled, then again with each matmul option of --extras (last: they may fail or be slow);
and, before 3, the GPU and CPU quantizers compared byte for byte on a few weights.
Records: {"kind": "env"}, {"kind": "load", "what", "seconds", ...}, {"kind": "row", "mode", ...}
(bench.comfy_core_flux.sample_once's fields), {"kind": "check", ...}, {"kind": "skip", ...}.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .ballast import budget_label
from .comfy_core_flux import (FluxWorkload, graph_breaks, import_comfy, linear_class, make_inputs, sample_once,
                              with_torch_compile)
from .results import device_environment
from .table import fmt

READ_CHUNK = 64 << 20


@dataclass(frozen=True)
class OursMode:
    name: str
    compute: str        # QuantConfig.compute: "fp8" (torch._scaled_mm) or "dequant" (bf16 matmul)
    act_scaling: str    # QuantConfig.act_scaling
    what: str


OURS = {m.name: m for m in (
    OursMode("ours_fp8_token", "fp8", "per_token", "per-channel fp8 weights, fp8 matmul, per-token activation scales"),
    OursMode("ours_fp8_tensor", "fp8", "per_tensor", "per-channel fp8 weights, fp8 matmul, one activation scale"),
    OursMode("ours_dequant", "dequant", "per_token", "per-channel fp8 weights, dequantized to bf16 per matmul"),
)}
# Process-wide fp8 GEMM options tried on the per-token model (quant.matmul.Fp8MatmulOptions fields).
EXTRAS = {"fast_accum": {"fast_accum": True}, "triton": {"act_quant": "triton"},
          "triton_fast_accum": {"act_quant": "triton", "fast_accum": True}, "compiled": {"act_quant": "compiled"},
          "torch_compile": {}, "torch_compile_fast_accum": {"fast_accum": True}, "blocks_compile": {}}
# Extras sampled through ComfyUI's torch.compile wrapper (inductor fuses our activation quantization): the whole
# diffusion model as its TorchCompileModel node does, or each block alone as our CompileModelBlocks does.
TORCH_COMPILE_EXTRAS = ("torch_compile", "torch_compile_fast_accum", "blocks_compile")
# Weights compared GPU path vs CPU path: the largest, a square one, a wide-input one.
CHECK_WEIGHTS = ("single_blocks.0.linear1.weight", "double_blocks.0.img_attn.proj.weight",
                 "single_blocks.0.linear2.weight")


def file_weight_dtype(path: Path) -> str:
    """The safetensors dtype most of the file's 2-D weights have ("BF16", "F8_E4M3")."""
    from quant.layouts import read_header
    from quant.safetensors_io import open_safetensors
    with open_safetensors(str(path)) as f:
        h = read_header(f, str(path))
    return Counter(h.st_dtypes[k] for k, s in h.shapes.items() if len(s) == 2).most_common(1)[0][0]


class Records:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_through(path: Path) -> dict:
    """Read the whole file once (page cache warm: every load below then reads memory, not disk)."""
    t0, n = time.perf_counter(), 0
    buf = bytearray(READ_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while (got := f.readinto(buf)) > 0:
            n += got
    s = time.perf_counter() - t0
    return {"kind": "cache", "file": str(path), "bytes": n, "seconds": s, "gb_per_s": n / s / 1e9}


def release(mm) -> None:
    """After the caller dropped its model: unload it from the GPU and free its host memory before the
    next load (one model at a time)."""
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


class Worker:
    def __init__(self, a, comfy, pack):
        self.a = a
        self.mm, self.comfy_sample, self.nodes = comfy
        self.loading, self.quant, self.qmatmul = pack
        self.device = self.mm.get_torch_device()
        self.cuda = self.device.type == "cuda"
        self.rec = Records(Path(a.rows_out))
        self.w = FluxWorkload(width=a.width, height=a.height, steps=a.steps, txt_tokens=a.txt_tokens)
        self.inputs = make_inputs(self.w)
        self.model_path = Path(a.model).resolve()
        self.work_dir = Path(a.work_dir)

    def time_left(self) -> float:
        return float("inf") if self.a.deadline is None else self.a.deadline - time.time()

    def timed_load(self, what: str, load, **info):
        gc.collect()
        t0 = time.perf_counter()
        out = load()
        seconds = time.perf_counter() - t0
        self.rec.emit({"kind": "load", "what": what, "seconds": seconds, **info})
        print(f"[ours] load {what}: {seconds:.2f} s {info or ''}", flush=True)
        return out

    def sample(self, model, mode: str, budget_gib=None, repeat=False, **info) -> dict:
        name = f"{mode}_{budget_label(budget_gib)}{'_again' if repeat else ''}"
        latent = Path(self.a.latent_dir) / f"{name}.pt"
        try:
            row = sample_once(model, self.w, self.inputs, budget_gib, self.device, self.mm, self.comfy_sample, latent)
        except Exception as e:  # one failing row must not cost the rows after it (one GPU call per run)
            traceback.print_exc()
            row = {"budget_gib": budget_gib, "budget": budget_label(budget_gib), "s_per_it": None,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        row.update(kind="row", mode=mode, repeat=repeat, linear_class=linear_class(model), **info)
        self.rec.emit(row)
        print(f"[ours] {name}: s/it={fmt(row.get('s_per_it'), 4)} first={fmt(row.get('first_step_s'), 2)}s "
              f"peak={fmt(row.get('peak_gib'), 2)} GiB finite={fmt(row.get('latent_finite'))}"
              + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)
        return row

    def load_ours(self, path: Path, mode: OursMode, what: str, save_to: Path | None = None, repeat: bool = False):
        cfg = self.loading.Fp8LoadConfig(self.quant.QuantConfig(compute=mode.compute, act_scaling=mode.act_scaling),
                                         "auto", str(save_to) if save_to else None)
        model, report = self.timed_load(what, lambda: self.loading.load_fp8_model(str(path), cfg), mode=mode.name,
                                        quant_device=str(self.loading.quantization_device()), repeat=repeat,
                                        file_bytes=path.stat().st_size)
        self.rec.emit({"kind": "report", "what": what, "mode": mode.name, **asdict(report)})
        return model

    # --- the steps ---------------------------------------------------------------------------------
    def comfy_load(self, path: Path, what: str) -> None:
        for i in range(self.a.load_repeats):
            (model,) = self.timed_load(what, lambda: self.nodes.UNETLoader().load_unet(path.name, "default"),
                                       repeat=i > 0, file_bytes=path.stat().st_size,
                                       file_weight_dtype=file_weight_dtype(path))
            del model
            release(self.mm)

    def ours_modes(self) -> None:
        for mode in (OURS[m] for m in self.a.modes):
            model = self.load_ours(self.model_path, mode, "ours_quantize_load")
            self.sample(model, mode.name, what=mode.what)
            if mode.name == "ours_dequant" and "blocks_compile" in self.a.extras and self.cuda:
                # The dequant model with CompileModelBlocks: inductor fuses the weight cast into one kernel
                # per layer and the norms and modulations around the matmuls, as it does for the fp8 model.
                self.sample_with_options(model, mode.name, "blocks_compile")
            if mode.name == "ours_fp8_token":
                if self.a.noise_check:
                    self.sample(model, mode.name, repeat=True)
                if self.a.budget_row is not None and self.cuda:
                    self.sample(model, mode.name, self.a.budget_row)
            del model
            release(self.mm)

    def inline_copy_loads(self) -> None:
        """The quantizing load with results copied out of staging on the main thread (the helper thread off)."""
        dq = importlib.import_module("lowvram_kit.quant.device_quant")
        mode = OURS["ours_fp8_token"]
        dq.COPY_OUT_IN_THREAD = False
        try:
            for i in range(self.a.load_repeats):
                model = self.load_ours(self.model_path, mode, "ours_quantize_load_inline_copy", repeat=i > 0)
                del model
                release(self.mm)
        finally:
            dq.COPY_OUT_IN_THREAD = True

    def sample_with_options(self, model, mode: str, extra: str) -> None:
        compiles = extra == "compiled" or extra in TORCH_COMPILE_EXTRAS
        if compiles and self.time_left() < self.a.compile_reserve_s:
            self.rec.emit({"kind": "skip", "what": f"{mode}+{extra}", "why": "too little time left before the deadline"})
            return
        options = self.qmatmul.Fp8MatmulOptions(**EXTRAS[extra])
        previous = self.qmatmul.set_fp8_matmul_options(options)
        try:
            if extra in TORCH_COMPILE_EXTRAS:
                blocks = importlib.import_module("lowvram_kit.nodes.comfy_block_compile")
                compiled = blocks.compile_blocks(model) if extra == "blocks_compile" else with_torch_compile(model)
                row = self.sample(compiled, f"{mode}+{extra}", options=asdict(options))
                row_breaks = graph_breaks()
                self.rec.emit({"kind": "check", "what": "graph breaks under torch.compile", "extra": extra,
                               "graph_breaks": row_breaks, "row_ok": row.get("s_per_it") is not None})
                print(f"[ours] {extra}: graph breaks {row_breaks or 'none'}", flush=True)
            else:
                self.sample(model, f"{mode}+{extra}", options=asdict(options))
        finally:
            self.qmatmul.set_fp8_matmul_options(previous)

    def saved_copy(self) -> None:
        mode = OURS["ours_fp8_token"]
        copy = self.work_dir / f"{self.model_path.stem}.lowvram-e4m3fn-per_channel.safetensors"
        model = self.load_ours(self.model_path, mode, "ours_quantize_load_and_save", save_to=copy)
        del model
        release(self.mm)
        try:
            for i in range(self.a.load_repeats):
                model = self.load_ours(copy, mode, "ours_reload_saved_copy", repeat=i > 0)
                if i == self.a.load_repeats - 1:   # the run's last model: experiments that may fail or take long
                    self.sample(model, "ours_fp8_reloaded", what="the saved copy, loaded again")
                    for extra in self.a.extras:
                        self.sample_with_options(model, mode.name, extra)
                del model
                release(self.mm)
        finally:
            copy.unlink(missing_ok=True)

    def comfy_fp8_file(self) -> None:
        plain = self.work_dir / f"{self.model_path.stem}-fp8-e4m3fn-plain.safetensors"
        t0 = time.perf_counter()
        cast = self.quant.QuantConfig(granularity="none")
        sd = {k: t for k, t in self.quant.iter_quantized(str(self.model_path), cast,
                                                          device=self.loading.quantization_device())
              if not k.endswith(".weight_scale")}
        self.quant.save_atomic(sd, str(plain), {})
        del sd
        self.rec.emit({"kind": "prep", "what": "plain fp8 file written", "seconds": time.perf_counter() - t0,
                       "bytes": plain.stat().st_size})
        try:
            self.comfy_load(plain, "comfy_load_fp8_file")
        finally:
            plain.unlink(missing_ok=True)

    def compare_paths(self) -> None:
        """GPU (or here: the device pipeline) against the CPU row-block path, byte for byte."""
        stream = importlib.import_module("lowvram_kit.quant.stream")
        r = stream._Reader(str(self.model_path), "")
        names = [n for n in CHECK_WEIGHTS if r.has(n)]
        cfg = self.quant.QuantConfig()
        for name in names:
            shape = r.header.shapes[name]
            t0 = time.perf_counter()
            q_host, s_host = stream._quantize_rows(r, name, shape, cfg)
            host_s = time.perf_counter() - t0
            n = q_host.numel()
            dq = stream.DeviceQuantizer(self.loading.quantization_device(), n * r.header.dtype(name).itemsize, n)
            t0 = time.perf_counter()
            q_dev, s_dev, _ = dq.submit(name, r.tensor(name), cfg).result()
            dev_s = time.perf_counter() - t0
            dq.close()
            r.close()
            same = torch.equal(q_host.view(torch.uint8), q_dev.view(torch.uint8)) and torch.equal(s_host, s_dev)
            self.rec.emit({"kind": "check", "what": "device path bytes == CPU path bytes", "tensor": name,
                           "shape": list(shape), "identical": bool(same), "cpu_s": host_s, "device_s": dev_s,
                           "device": str(dq.device)})
            print(f"[ours] {name}: device bytes identical to CPU: {same} (CPU {host_s:.2f} s, device {dev_s:.2f} s)",
                  flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, comfy_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(prog="python -m bench.fp8_flux_ours", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows-out", required=True)
    ap.add_argument("--latent-dir", required=True)
    ap.add_argument("--work-dir", required=True, help="where the saved copy and the plain fp8 file go (deleted after)")
    ap.add_argument("--budget-row", type=float, default=None, help="GiB budget for one more per-token row (CUDA)")
    ap.add_argument("--modes", default=",".join(OURS), help=f"comma list of {', '.join(OURS)}")
    ap.add_argument("--extras", default="", help=f"comma list of {', '.join(EXTRAS)}")
    ap.add_argument("--load-repeats", type=int, default=2, help="times each load is timed")
    ap.add_argument("--noise-check", action="store_true")
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds; optional steps skip near it")
    ap.add_argument("--compile-reserve-s", type=float, default=150.0)
    for f in ("width", "height", "steps", "txt_tokens"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(FluxWorkload, f))
    a = ap.parse_args(ours)
    a.extras = [e for e in a.extras.split(",") if e]
    a.modes = [m for m in a.modes.split(",") if m]
    if unknown := [e for e in a.extras if e not in EXTRAS] + [m for m in a.modes if m not in OURS]:
        ap.error(f"--modes/--extras: unknown {unknown}; choose from {', '.join(OURS)} / {', '.join(EXTRAS)}")
    if a.load_repeats < 1:
        ap.error("--load-repeats must be >= 1")
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        raise SystemExit("COMFYUI_PATH is not set: point it at a ComfyUI tree (the folder with main.py)")

    logging.basicConfig(level=logging.INFO, format="[comfy] %(message)s")
    _args, mm, comfy_sample, folder_paths, nodes = import_comfy(comfyui_path, comfy_argv)
    from harness.pack_import import import_pack
    import_pack()
    pack = tuple(importlib.import_module(f"lowvram_kit.{m}") for m in ("nodes.comfy_fp8_loading", "quant",
                                                                        "quant.matmul"))
    w = Worker(a, (mm, comfy_sample, nodes), pack)
    w.work_dir.mkdir(parents=True, exist_ok=True)
    for folder in (w.model_path.parent, w.work_dir):
        folder_paths.add_model_folder_path("diffusion_models", str(folder))
    w.rec.emit({"kind": "env", "mode": "ours", **device_environment(w.device), "comfy_argv": comfy_argv,
                "vram_state": mm.vram_state.name, "workload": asdict(w.w), "model": str(w.model_path),
                "model_file_bytes": w.model_path.stat().st_size, "torch_threads": torch.get_num_threads()})
    w.rec.emit(read_through(w.model_path))
    failed = []
    stages = (("comfy_load_bf16_file", lambda: w.comfy_load(w.model_path, "comfy_load_bf16_file")),
              ("compare_paths", w.compare_paths), ("ours_modes", w.ours_modes),
              ("inline_copy_loads", w.inline_copy_loads), ("comfy_fp8_file", w.comfy_fp8_file),
              ("saved_copy", w.saved_copy))
    for name, stage in stages:
        try:
            stage()
        except Exception as e:  # record and go on: the stages after it measure other things
            traceback.print_exc()
            w.rec.emit({"kind": "stage_error", "stage": name, "error": f"{type(e).__name__}: {e}"[:500]})
            failed.append(name)
            release(mm)
    mm.unload_all_models()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
