"""Issues #8, #7 and #6 on the GPU: every shipped workflow in a real ComfyUI server, end to end, inside its
card's budget, beside ComfyUI core running the same graph; and VRAMGuard's adapt ladder below the tier.

    COMFYUI_PATH=... python -m bench.workflows_e2e --models-dir /tmp/models --out-dir DIR \
        [--workflows flux_dev_8gb,...] [--parts tier,core,ladder,extra] [--time-budget-s 540]
    python -m bench.workflows_e2e --smoke --workflows flux_dev_8gb   # CPU: tiny models, checks the harness

For each workflow (its tier, e.g. 12 GiB, from the file name; a ballast process leaves exactly that free
before the server starts, so the server's own CUDA context counts against the budget as on a real card):
- tier: our graph, first prompt after the server started (models from the page cache) and a repeat prompt
  with the next seed (what clicking Queue again costs): wall time, seconds per stage, sampler s/it over
  steps 2..N, device-memory peak overall and per stage (NVML, above what the GPU held before the server).
- core: the same graph rewritten to ComfyUI core nodes (bench.core_graph), same budget, same prompts.
- ladder: our graph at every budget below the tier down to 4 GiB in one server (ballast re-made between
  prompts, models freed first), few steps: does VRAMGuard's adapt policy finish with the peak inside?
- te_ab: our graph without ChunkedOffloadTextEncoder, the text encoders loaded and evicted by ComfyUI.
- extra: the unconstrained references: Flux core graph (fp8 as in Comfy-Org's official graph, and bf16),
  NewBie resident bf16 pipeline (newbie_24gb unconstrained) and NewBie fp8 + streaming at 6 GiB (issue #7).
Full-size synthetic models are written once per family in a subprocess (no CUDA in this process), and
`--cleanup` deletes a family's files when no later job needs them (the machine's disk holds one family).
Results go to bench/results/workflows_e2e_<device>_<stamp>.json after every job (a cut-short run keeps what
it measured); the table printed last is what the README shows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.main import CPU_DEFAULTS, apply_overrides, load_workflow, required_model_files
from harness.server import ComfyServer, ServerConfig, ServerError
from harness.workflow_api import TEST_NODES_DIR, ui_to_api, use_tiny_text_encoders

from . import stack_sampler
from .ballast_process import BallastError, BallastProcess
from .core_graph import bypass, to_core
from .nvml_timeline import NvmlTimeline
from .results import REPO_ROOT, RESULTS_DIR, host_environment, utc_now, write_json
from .workflow_prompt import GiB, run_prompt

FAMILIES = ("sdxl", "z_image_turbo", "newbie", "flux_dev")   # smallest files first
LADDER_BUDGETS = (16, 12, 8, 6, 4)                             # GiB below a tier, down to the floor we test
LADDER_STEPS = 4
HELD_CENSUS_BYTES = 1 << 30                                      # held after /free beyond this: take a census
FRONT_END = REPO_ROOT / ".device" / "frontend"


@dataclass(frozen=True)
class Job:
    workflow: str
    graph: str                      # "ours" | "core"
    budgets: tuple[float | None, ...]  # None = unconstrained; more than one = a ladder in one server
    part: str                       # tier | core | ladder | extra
    repeat: bool = True             # a second prompt with the next seed (first budget only)
    steps: int | None = None        # override the workflow's steps (ladder)
    label: str = ""

    @property
    def family(self) -> str:
        return next(f for f in FAMILIES if self.workflow.startswith(f))


def tier_gib(workflow: str) -> int:
    m = re.search(r"_(\d+)gb$", workflow)
    if not m:
        raise ValueError(f"workflow name {workflow!r} does not end in _<N>gb")
    return int(m.group(1))


def plan_jobs(workflows: list[str], parts: set[str]) -> list[Job]:
    jobs = []
    for w in sorted(workflows, key=lambda n: (FAMILIES.index(Job(n, "", (), "").family), tier_gib(n))):
        tier = float(tier_gib(w))
        if "tier" in parts:
            jobs.append(Job(w, "ours", (tier,), "tier"))
        if "te_ab" in parts:   # the same graph without ChunkedOffloadTextEncoder (nothing to compare without one)
            jobs.append(Job(w, "ours-plainte", (tier,), "te_ab", label="text encoders as ComfyUI loads them"))
        if "core" in parts:
            jobs.append(Job(w, "core", (tier,), "core"))
        if "ladder" in parts:
            lower = tuple(float(b) for b in LADDER_BUDGETS if b < tier)
            if lower:
                jobs.append(Job(w, "ours", lower, "ladder", repeat=False, steps=LADDER_STEPS))
        if "extra" in parts and w == "flux_dev_24gb":
            jobs.append(Job(w, "core", (None,), "extra", label="Flux core graph fp8, unconstrained"))
            jobs.append(Job(w, "core-bf16", (None,), "extra", label="Flux core graph bf16, unconstrained"))
        if "extra" in parts and w == "newbie_24gb":
            jobs.append(Job(w, "ours", (None,), "extra", label="NewBie resident bf16 pipeline, unconstrained"))
        if "extra" in parts and w == "newbie_12gb":
            jobs.append(Job(w, "ours", (6.0,), "extra", label="NewBie fp8 pipeline in 6 GiB (issue #7)"))
            jobs.append(Job(w, "ours-nf4", (6.0,), "extra", label="NewBie pipeline, NF4 text encoders, in 6 GiB "
                            "(issue #7; needs bitsandbytes)"))
            jobs.append(Job(w, "ours-nf4-compiled", (6.0,), "extra", label="NewBie pipeline, NF4 text encoders, "
                            "CompileModelBlocks after ChunkedOffloadUNet, in 6 GiB (issue #7)"))
        # issue #7: both NewBie pipelines with one attention kernel (cuDNN through FlashAttnToggle), same footing
        if "attn" in parts and w == "newbie_24gb":
            jobs.append(Job(w, "ours-cudnn", (None,), "attn", label="NewBie resident bf16 pipeline, cuDNN attention "
                            "(FlashAttnToggle), unconstrained"))
        if "fast" in parts and w == "newbie_12gb":
            jobs.append(Job(w, "ours-fast", (6.0,), "fast", label="NewBie fp8 pipeline in 6 GiB, Float8DiTLoader "
                            "compute auto_fast_accum"))
        if "noguard" in parts and w == "newbie_12gb":   # A/B: VRAMGuard's 10 ms memory monitor thread off
            jobs.append(Job(w, "ours-noguard", (6.0,), "noguard", label="NewBie fp8 pipeline in 6 GiB without "
                            "VRAMGuard"))
        if "fidelity" in parts and w == "newbie_12gb":   # the sampled latents with and without graphs: same bits?
            for graph in ("ours-latent", "ours-nographs-latent"):
                jobs.append(Job(w, graph, (6.0,), "fidelity", label="the sampler's latents saved (SaveLatent)"))
        if "nographs" in parts:   # A/B: ChunkedOffloadUNet's CUDA graphs off; NewBie at issue #7's 6 GiB
            jobs.append(Job(w, "ours-nographs", (6.0 if w == "newbie_12gb" else tier,), "nographs",
                            label="ChunkedOffloadUNet without CUDA graphs (eager model calls)"))
        if "compiled" in parts and w == "newbie_12gb":
            jobs.append(Job(w, "ours-compiled", (6.0,), "compiled", label="NewBie fp8 pipeline in 6 GiB, "
                            "CompileModelBlocks after ChunkedOffloadUNet"))
        if "precise" in parts and w == "newbie_12gb":
            jobs.append(Job(w, "ours-precise", (6.0,), "precise", label="NewBie fp8 pipeline in 6 GiB, Float8DiTLoader "
                            "compute auto (no fast accumulation)"))
        if "attn" in parts and w == "newbie_12gb":
            jobs.append(Job(w, "ours-cudnn", (6.0,), "attn", label="NewBie fp8 pipeline in 6 GiB, cuDNN attention "
                            "(FlashAttnToggle)"))
    jobs.sort(key=lambda j: FAMILIES.index(j.family))
    return jobs


@dataclass
class Context:
    models_dir: Path
    object_info: dict
    smoke: bool
    timeline: NvmlTimeline
    empty_used: int | None          # device memory used before anything of ours ran
    generated: set[Path] = field(default_factory=set)
    warm_start: bool = False        # a throwaway server + prompt first: kernel caches warm, as from a user's 2nd start
    stacks_dir: Path | None = None  # sample the measured servers' prompt worker (bench.stack_sampler) into here


def graph_for(job: Job, ctx: Context) -> dict:
    api = ui_to_api(load_workflow(job.workflow), ctx.object_info)
    variants = set(job.graph.split("-")[1:]) if job.graph.startswith("ours") else set()
    if "nf4" in variants:   # the text encoders as NF4 (bitsandbytes), everything else as shipped
        for node in api.values():
            if node["class_type"] == "NewBieTextEncoderLoader":
                node["inputs"]["weight_format"] = "nf4"
    if "plainte" in variants:   # the text encoders as ComfyUI loads them (A/B for ChunkedOffloadTextEncoder)
        api = bypass(api, {"ChunkedOffloadTextEncoder": "clip"})
    if "noguard" in variants:   # the graph without VRAMGuard (its monitor thread samples NVML every 10 ms)
        api = bypass(api, {"VRAMGuard": "model"})
    if "nographs" in variants:   # every model call eager, as before ChunkedOffloadUNet replayed CUDA graphs
        for node in api.values():
            if node["class_type"] == "ChunkedOffloadUNet":
                node["inputs"]["cuda_graphs"] = False
    if "latent" in variants:   # the sampler's output saved too: its digest does not depend on how the VAE tiles
        (sampler,) = [nid for nid, node in api.items() if node["class_type"] == "KSampler"]
        api[str(max(int(nid) for nid in api) + 1)] = {"class_type": "SaveLatent", "inputs": {
            "samples": [sampler, 0], "filename_prefix": "latents/lowvram"}}
    if "compiled" in variants:
        insert_after(api, "ChunkedOffloadUNet", "CompileModelBlocks", {"mode": "default"})
    for variant, compute in (("fast", "auto_fast_accum"), ("precise", "auto")):   # the fp8 GEMMs' accumulation
        if variant in variants:
            for node in api.values():
                if node["class_type"] == "Float8DiTLoader":
                    node["inputs"]["compute"] = compute
    if "cudnn" in variants:   # FlashAttnToggle after the model's sampling patch, in any graph that has one
        insert_after(api, "ModelSamplingAuraFlow", "FlashAttnToggle", {"backend": "sdpa_cudnn", "on_unavailable": "error"})
    if job.graph.startswith("core"):
        api = to_core(api)
        if job.graph == "core-bf16":
            for node in api.values():
                if node["class_type"] == "UNETLoader":
                    node["inputs"]["weight_dtype"] = "default"
    if ctx.smoke:
        use_tiny_text_encoders(api)
        apply_overrides(api, dict(CPU_DEFAULTS))
    if job.steps:
        apply_overrides(api, {"steps": job.steps})
    return api


def insert_after(api: dict, class_type: str, new_class: str, widgets: dict) -> str:
    """Put a `new_class` node (MODEL in, MODEL out) after the one `class_type` node of an API graph, rewiring its
    consumers; returns the new node's id."""
    (source,) = [nid for nid, node in api.items() if node["class_type"] == class_type]
    new_id = str(max(int(nid) for nid in api) + 1)
    for node in api.values():
        for name, value in node["inputs"].items():
            if value == [source, 0]:
                node["inputs"][name] = [new_id, 0]
    api[new_id] = {"class_type": new_class, "inputs": {"model": [source, 0], **widgets}}
    return new_id


def ensure_models(api: dict, ctx: Context) -> list[str]:
    """Write missing synthetic files in a subprocess (CUDA there, none here); returns what was written."""
    from harness import synthetic

    size = "tiny" if ctx.smoke else "full"
    by_file = {(e.folder, e.filename): e.name for e in synthetic.REGISTRY.values()}
    written = []
    for folder, filename in required_model_files(api):
        name = by_file.get((folder, filename))
        if name is None:
            raise RuntimeError(f"{folder}/{filename} has no synthetic stand-in")
        path = synthetic.model_path(name, size, ctx.models_dir)
        if path.is_file():
            continue
        code = ("import sys; from harness.synthetic import ensure; "
                "ensure(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])")
        subprocess.run([sys.executable, "-c", code, name, size, str(ctx.models_dir), "cpu" if ctx.smoke else "cuda"],
                       check=True, cwd=REPO_ROOT)
        ctx.generated.add(path)
        written.append(name)
    return written


# More ComfyUI command-line flags for every measured server, space-separated (an A/B such as
# `--disable-cuda-malloc`: ComfyUI's own default is PyTorch's cudaMallocAsync backend).
SERVER_ARGS_ENV = "LOWVRAM_E2E_SERVER_ARGS"


def server_config(ctx: Context, base: Path, stacks: Path | None = None) -> ServerConfig:
    return ServerConfig(base_dir=base, models_dirs=(ctx.models_dir,), cpu=ctx.smoke,
                        extra_args=tuple(os.environ.get(SERVER_ARGS_ENV, "").split()),
                        front_end_root=FRONT_END if FRONT_END.is_dir() else None,
                        extra_node_dirs=(REPO_ROOT / TEST_NODES_DIR,) if ctx.smoke else (),
                        launcher=stack_sampler.launcher(stacks) if stacks else (),
                        env={"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                          os.environ.get("PYTHONPATH")]))}
                        if stacks else {})


class Budget:
    """The ballast for one budget, re-made while a server holds some memory of its own."""

    def __init__(self, ctx: Context):
        self.ctx, self.ballast, self.base_used = ctx, None, ctx.empty_used

    def set(self, gib: float | None, server_holds: int = 0) -> None:
        self.release()
        if gib is not None and not self.ctx.smoke and self.ctx.empty_used is not None:
            leave = int(gib * GiB) - server_holds
            if leave <= 0:
                raise BallastError(f"the server already holds {server_holds / GiB:.2f} GiB, more than {gib} GiB")
            self.ballast = BallastProcess(leave).__enter__()
        used = self.ctx.timeline.used_now()      # peaks are measured above this, less what the server holds
        self.base_used = None if used is None else used - server_holds

    def release(self) -> None:
        if self.ballast is not None:
            self.ballast.__exit__()
            self.ballast = None


def run_job(job: Job, ctx: Context) -> list[dict]:
    api = graph_for(job, ctx)
    rows: list[dict] = []
    base_row = {"workflow": job.workflow, "graph": job.graph, "part": job.part, "label": job.label}
    written = ensure_models(api, ctx)
    if written:
        rows.append({**base_row, "kind": "models_written", "names": written})
    budget = Budget(ctx)
    base = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    seen_reports: set[Path] = set()
    seen_outputs: set[Path] = set()
    server, stacks = None, None
    try:
        budget.set(job.budgets[0])
        warmup_s = _warm_up(ctx, base, api) if ctx.warm_start and job.part in ("tier", "te_ab", "core", "extra", "compiled", "noguard", "nographs") else None
        seen_outputs.update([*base.glob("output/**/*.png"), *base.glob("output/**/*.latent")])   # the warm-up's
        if ctx.stacks_dir is not None:
            stacks = ctx.stacks_dir / f"stacks_{job.workflow}_{job.graph}_{job.part}.tsv"
            stacks.unlink(missing_ok=True)
        server, start_s = _start(ctx, base, stacks)
        for i, gib in enumerate(job.budgets):
            restarted, held = False, None
            if i > 0:   # the ladder: free the models, then leave only the next budget beside what the server holds
                holds = _free_and_settle(server, budget, ctx)
                held = {"gib": round(holds / GiB, 3)}
                if holds > HELD_CENSUS_BYTES:   # more than a CUDA context: ask the server what holds it
                    held["census"] = _memory_census(server)
                if holds > gib * GiB - 0.5 * GiB:   # it kept more than the next budget allows: start afresh
                    server.stop()
                    budget.set(gib)
                    server, start_s = _start(ctx, base)
                    restarted = True
                else:
                    budget.set(gib, server_holds=holds)
            prompts = [("first" if i == 0 else "ladder", 0)] + ([("repeat", 1)] if job.repeat and i == 0 else [])
            for which, seed_offset in prompts:
                graph = json.loads(json.dumps(api))
                for node in graph.values():
                    if "seed" in node["inputs"] and isinstance(node["inputs"]["seed"], int):
                        node["inputs"]["seed"] += seed_offset
                row = run_prompt(server, graph, ctx.timeline, budget.base_used)
                if held is not None and which == "ladder":
                    row["held_after_free"] = held
                row.update(base_row, kind="prompt", prompt=which, budget_gib=gib, server_restarted=restarted,
                           server_start_s=round(start_s, 2) if which == "first" and (i == 0 or restarted) else None)
                row["within_budget"] = None if gib is None or row["peak_gib"] is None else row["peak_gib"] <= gib
                row["kernel_cache"] = "warm" if warmup_s is not None else "as found"
                if warmup_s is not None and which == "first":
                    row["warmup_prompt_s"] = warmup_s
                images = sorted(p for p in set(base.glob("output/**/*.png")) - seen_outputs
                                if "vramguard" not in p.parts)   # VRAMGuard's report chart is no output image
                seen_outputs.update(images)
                # Pixels only (the PNG also holds the prompt, which differs between graphs): equal digests of two
                # graphs at one seed mean bit-identical images (ChunkedOffloadUNet's CUDA graphs against eager).
                row["image_pixels_sha256"] = [pixel_digest(p) for p in images]
                row["image_files"] = [str(p.relative_to(base)) for p in images]
                latents = sorted(set(base.glob("output/**/*.latent")) - seen_outputs)
                seen_outputs.update(latents)
                if latents:
                    row["latent_sha256"] = [latent_digest(p) for p in latents]
                fresh = sorted(set(base.glob("output/**/vramguard_*.json")) - seen_reports)
                seen_reports.update(fresh)
                if fresh:   # what VRAMGuard predicted and changed for this prompt
                    row["vramguard_report"] = _guard_summary(json.loads(fresh[-1].read_text()))
                rows.append(row)
                print(f"[e2e] {job.workflow} {job.graph} {which} @ {gib} GiB: {row['prompt_s']:.2f} s, "
                      f"s/it {row['s_per_it']} (median step {row.get('s_per_it_median')}), peak {row['peak_gib']} GiB "
                      f"{row.get('error', '')}", flush=True)
    except (ServerError, BallastError, RuntimeError, OSError) as e:
        rows.append({**base_row, "kind": "error", "error": f"{type(e).__name__}: {str(e)[:1500]}"})
        print(f"[e2e] {job.workflow} {job.graph}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        if server is not None:   # a server that died says why only in its log, which goes with `base` below
            rows[-1]["server_log_tail"] = server.log_tail(80)
            print(rows[-1]["server_log_tail"][-4000:], flush=True)
    finally:
        if server is not None:
            server.stop()
        budget.release()
        shutil.rmtree(base, ignore_errors=True)
        if stacks is not None and stacks.is_file():   # one burst per prompt: the first, then the repeat
            print(stack_sampler.report(stacks), flush=True)
    return rows


def pixel_digest(path: Path) -> str:
    """sha256 of an image's mode, size and pixel bytes."""
    from PIL import Image

    with Image.open(path) as img:
        return hashlib.sha256(f"{img.mode} {img.size}".encode() + img.tobytes()).hexdigest()


def latent_digest(path: Path) -> str:
    """sha256 of a SaveLatent file's tensor: dtype, shape and bytes (its header also holds the prompt)."""
    import torch
    from safetensors.torch import load_file

    t = load_file(str(path))["latent_tensor"].contiguous()
    return hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()
                          ).hexdigest()


def _warm_up(ctx: Context, base: Path, api: dict) -> float | None:
    """Run the graph once in a server that is then stopped, so that the measured first prompt after a start
    finds what persists across a user's restarts warm (Triton's kernel cache on disk, the page cache) and
    nothing else: the measured server starts fresh. Returns the throwaway prompt's seconds (None: failed)."""
    server = None
    try:
        server, _ = _start(ctx, base)
        row = run_prompt(server, json.loads(json.dumps(api)), None, None)
        return None if "error" in row else round(row["prompt_s"], 3)
    except (ServerError, RuntimeError, OSError) as e:
        print(f"[e2e] warm-up failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None
    finally:
        if server is not None:
            server.stop()


def _start(ctx: Context, base: Path, stacks: Path | None = None) -> tuple[ComfyServer, float]:
    t0 = time.monotonic()
    server = ComfyServer(server_config(ctx, base, stacks))
    server.start()
    return server, time.monotonic() - t0


def _free_and_settle(server: ComfyServer, budget: Budget, ctx: Context, wait_s: float = 15.0) -> int:
    """Ask the server to unload its models, drop the ballast, and wait until the server's device memory stops
    falling; returns the bytes it still holds (its CUDA context at least).

    /free is asked again at every poll: ComfyUI's prompt worker reads the flag only when woken, and the
    wake-up is lost if it comes while the worker is still busy after the prompt (its gc.collect); the worker
    then sleeps with the models loaded until the next prompt. That was the '7.5 GiB held after /free' of
    flux_dev_24gb's 8 GiB ladder row: the census showed Flux and the VAE still in ComfyUI's loaded models."""
    server.free(unload_models=True)
    budget.release()
    deadline, last, still = time.monotonic() + wait_s, None, 0
    while time.monotonic() < deadline:
        time.sleep(0.5)
        server.free(unload_models=True)
        holds = max((ctx.timeline.used_now() or 0) - (ctx.empty_used or 0), 0)
        still = still + 1 if last is not None and holds >= last else 0
        if still >= 3:
            return holds
        last = holds
    return last or 0


def _memory_census(server: ComfyServer) -> dict:
    """The pack's GET /lowvram/memory: allocator bytes, ComfyUI's loaded models and the largest live tensors
    by owner, so that memory held after /free names what holds it."""
    try:
        return server.get("/lowvram/memory?top=15", timeout=120)
    except (OSError, ValueError) as e:   # urllib errors are OSErrors; a bad body is a ValueError
        return {"error": f"{type(e).__name__}: {e}"}


def _guard_summary(report: dict) -> dict:
    """The parts of a VRAMGuard report a benchmark row needs (the full report has the whole timeline)."""
    keep = ("policy", "decision", "prediction", "plan", "actions", "changes", "peak", "stages", "retries", "oom",
            "warnings", "budget", "predicted_peak_bytes", "measured_peak_bytes", "events", "timings")
    return {k: v for k, v in report.items() if k in keep or not isinstance(v, (list, dict))}


def cleanup_family(done: Job, remaining: list[Job], ctx: Context) -> None:
    """Delete generated files of `done`'s family that no remaining job uses (the disk holds one family)."""
    if any(j.family == done.family for j in remaining):
        return
    needed = {name for j in remaining for _, name in required_model_files(graph_for(j, ctx))}
    for path in sorted(ctx.generated):
        if path.name not in needed and path.is_file():
            path.unlink()
            ctx.generated.discard(path)


def fetch_object_info(ctx_models: Path, smoke: bool) -> dict:
    base = Path(tempfile.mkdtemp(prefix="bench-e2e-info-"))
    cfg = ServerConfig(base_dir=base, models_dirs=(ctx_models,), cpu=True,
                       front_end_root=FRONT_END if FRONT_END.is_dir() else None,
                       extra_node_dirs=(REPO_ROOT / TEST_NODES_DIR,) if smoke else ())
    try:
        with ComfyServer(cfg) as server:
            return server.object_info()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def table(rows: list[dict]) -> str:
    lines = [f"{'workflow':<20} {'graph':<9} {'part':<6} {'prompt':<7} {'GiB':>5} {'wall s':>7} {'s/it':>7} "
             f"{'peak':>6} ok  note"]
    for r in rows:
        if r.get("kind") == "prompt":
            ok = {True: "yes", False: "NO", None: "-"}[r.get("within_budget")] if "error" not in r else "ERR"
            budget = "-" if r["budget_gib"] is None else f"{r['budget_gib']:g}"
            sit = "-" if r.get("s_per_it") is None else f"{r['s_per_it']:.3f}"
            peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
            lines.append(f"{r['workflow']:<20} {r['graph']:<9} {r['part']:<6} {r['prompt']:<7} {budget:>5} "
                         f"{r['prompt_s']:7.2f} {sit:>7} {peak:>6} {ok:<3} {r.get('error', '')[:80]}")
        elif r.get("kind") == "error":
            lines.append(f"{r['workflow']:<20} {r['graph']:<9} {r['part']:<6} ERROR {r['error'][:120]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.workflows_e2e", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, scaled-down workflows")
    ap.add_argument("--workflows", default="", help="comma list (default: every shipped workflow)")
    ap.add_argument("--parts", default="tier,core,ladder,extra")
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--time-budget-s", type=float, default=0, help="stop starting jobs after this long (0: no limit)")
    ap.add_argument("--cleanup", action="store_true", help="delete a family's synthetic files after its last job")
    ap.add_argument("--graphs", default="", help="comma list of graph variants to keep, e.g. ours (default: all; "
                    "ours, ours-nf4, ours-nf4-compiled, ours-plainte, ours-cudnn, ours-fast, ours-precise, core, core-bf16)")
    ap.add_argument("--warm-start", action="store_true", help="before the measured server of each tier, te_ab, core and extra "
                    "job, run the graph once in a throwaway server (kernel caches warm, as on a user's next start)")
    ap.add_argument("--stack-samples", default=None, help="a folder: sample each measured server's prompt worker "
                    "(bench.stack_sampler) into it and print the call tree of every prompt")
    a = ap.parse_args(argv)
    from harness.main import available_workflows
    from harness.synthetic.cache import default_models_dir

    workflows = [w for w in a.workflows.split(",") if w] or available_workflows()
    if unknown := sorted(set(workflows) - set(available_workflows())):
        ap.error(f"--workflows: unknown {unknown}")
    jobs = plan_jobs(workflows, set(a.parts.split(",")))
    if a.graphs:
        jobs = [j for j in jobs if j.graph in a.graphs.split(",")]
        if not jobs:
            ap.error(f"--graphs {a.graphs}: no job of --workflows/--parts runs that graph")
    models_dir = Path(a.models_dir or default_models_dir("tiny" if a.smoke else "full")).resolve()
    models_dir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with NvmlTimeline() as timeline:
        ctx = Context(models_dir, fetch_object_info(models_dir, a.smoke), a.smoke, timeline, timeline.used_now(),
                      warm_start=a.warm_start, stacks_dir=Path(a.stack_samples) if a.stack_samples else None)
        if ctx.stacks_dir is not None:
            ctx.stacks_dir.mkdir(parents=True, exist_ok=True)
        device = _device_name()
        stamp = time.strftime("%Y-%m-%dT%H%M")
        out = out_dir / f"workflows_e2e_{'smoke' if a.smoke else device}_{stamp}.json"
        for suffix in "bcdefgh":   # two runs within a minute (a round's A/B halves) must not overwrite each other
            if not out.exists():
                break
            out = out.with_name(f"workflows_e2e_{'smoke' if a.smoke else device}_{stamp}{suffix}.json")
        result = {"benchmark": "workflows_e2e", "smoke": a.smoke, "started": utc_now(),
                  "environment": host_environment(None), "device": device,
                  "command": "python -m bench.workflows_e2e " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "jobs": [j.__dict__ | {"budgets": list(j.budgets)} for j in jobs], "rows": []}
        for i, job in enumerate(jobs):
            if a.time_budget_s and time.monotonic() - started > a.time_budget_s:
                result["rows"].append({"workflow": job.workflow, "graph": job.graph, "part": job.part,
                                       "kind": "skipped", "why": "time budget"})
                continue
            result["rows"] += run_job(job, ctx)
            if a.cleanup:
                cleanup_family(job, jobs[i + 1:], ctx)
            write_json(out, result)
        result["finished"] = utc_now()
        write_json(out, result)
    print(table(result["rows"]))
    print(f"[e2e] wrote {out}")
    return 0


def _device_name() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        return (name.decode() if isinstance(name, bytes) else name).lower().replace(" ", "-")
    except Exception:  # noqa: BLE001  (no NVIDIA driver: a CPU run)
        return "cpu"


if __name__ == "__main__":
    sys.exit(main())
