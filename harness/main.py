"""The README's main command: run a shipped workflow end to end in a real, headless ComfyUI.

    scripts/run.sh                                   # default workflow, synthetic models
    scripts/run.sh --workflow sdxl_24gb --models ~/ComfyUI/models   # the user's real files

It starts ComfyUI with the pack linked in, makes the synthetic models the workflow needs (once, cached)
unless --models points at real ones, converts the shipped UI workflow to the API format, queues it,
shows progress, saves the image(s) and prints a short report (time per stage, peak memory).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .memory_sampler import PeakSampler
from .paths import REPO_ROOT, ComfyNotFoundError, comfy_version, find_comfyui
from .progress import ProgressListener
from .synthetic.cache import default_models_dir
from .server import MODEL_FOLDERS, ComfyServer, ServerConfig, ServerError, port_in_use
from .workflow_api import TEST_NODES_DIR, WorkflowError, ui_to_api, use_tiny_text_encoders

WORKFLOWS_DIR = REPO_ROOT / "workflows"
DEFAULT_WORKFLOW = "sdxl_24gb"
# Widget inputs of loader nodes that name a model file, and the models folder they read from.
MODEL_WIDGETS = {
    "ckpt_name": "checkpoints", "unet_name": "diffusion_models", "model_name": "diffusion_models",
    "clip_name": "text_encoders", "clip_name1": "text_encoders", "clip_name2": "text_encoders",
    "vae_name": "vae", "lora_name": "loras", "gemma_name": "text_encoders", "jina_name": "text_encoders",
}
# What the CPU can run in minutes: workflows are scaled down there unless the user says otherwise.
CPU_DEFAULTS = {"width": 256, "height": 256, "steps": 4}


class MainError(RuntimeError):
    pass


def available_workflows() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))


def load_workflow(name: str) -> dict:
    path = Path(name) if name.endswith(".json") else WORKFLOWS_DIR / f"{name}.json"
    if not path.is_file():
        raise MainError(f"no workflow {name!r}; shipped workflows: {', '.join(available_workflows())}")
    return json.loads(path.read_text())


def required_model_files(api: dict) -> list[tuple[str, str]]:
    """(folder, filename) for every model file the graph's loaders name."""
    return sorted({(MODEL_WIDGETS[k], v) for node in api.values() for k, v in node["inputs"].items()
                   if k in MODEL_WIDGETS and isinstance(v, str)})


def ensure_synthetic(files: list[tuple[str, str]], size: str, device: str, models_dir: Path | None = None) -> None:
    """Write the synthetic stand-in of each file (cached). A file with no stand-in (a LoRA) must already be in
    models_dir (the default models dir of `size` when None)."""
    from . import synthetic

    by_file = {(e.folder, e.filename): e.name for e in synthetic.REGISTRY.values()}
    root = Path(models_dir) if models_dir else default_models_dir(size)
    for folder, filename in files:
        name = by_file.get((folder, filename))
        if name is None and any((root / sub / filename).is_file() for sub in MODEL_FOLDERS[folder]):
            continue
        if name is None:
            raise MainError(f"the workflow needs {folder}/{filename}, which has no synthetic stand-in; "
                            "run it with --models pointing at a folder that holds the real file")
        print(f"[lowvram] synthetic model {name} ({size}) for {folder}/{filename}", flush=True)
        synthetic.ensure(name, size, device=device)


def check_real_models(files: list[tuple[str, str]], models_dir: Path) -> None:
    for folder, filename in files:
        candidates = [models_dir / sub / filename for sub in MODEL_FOLDERS[folder]]
        if not any(c.is_file() for c in candidates):
            raise MainError(f"model file {filename} not found in {models_dir}/{MODEL_FOLDERS[folder][0]}/ "
                            f"(the workflow's loader needs it there)")


def apply_overrides(api: dict, overrides: dict) -> None:
    for node in api.values():
        for key, value in overrides.items():
            if key in node["inputs"] and not isinstance(node["inputs"][key], list):
                node["inputs"][key] = value


def prepare_tiny(api: dict, overrides: dict, device: str = "cpu") -> list[str]:
    """Make a converted workflow runnable on tiny synthetic models (in place): write the models it names,
    swap core text-encoder loaders for the test loader, scale it down. Returns the node ids swapped."""
    ensure_synthetic(required_model_files(api), "tiny", device)
    swapped = use_tiny_text_encoders(api)
    apply_overrides(api, overrides)
    return swapped


def run(args: argparse.Namespace) -> dict:
    import torch

    comfy = find_comfyui()
    on_gpu = torch.cuda.is_available() and not args.cpu
    size = args.size or ("full" if on_gpu else "tiny")
    ui = load_workflow(args.workflow)
    if args.port and port_in_use(args.port):
        raise MainError(f"port {args.port} is in use; pass another --port, or leave it out to pick a free one")

    base = Path(tempfile.mkdtemp(prefix="lowvram-run-"))
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"workflow": args.workflow, "comfyui": comfy_version(comfy), "device": "cuda" if on_gpu else "cpu"}
    models_dir = Path(args.models).resolve() if args.models else default_models_dir(size)
    models_dir.mkdir(parents=True, exist_ok=True)
    tiny = size == "tiny" and not args.models
    config = ServerConfig(base_dir=base, models_dirs=(models_dir,), cpu=not on_gpu, port=args.port or 0,
                          front_end_root=Path(args.front_end_root) if args.front_end_root else None,
                          extra_node_dirs=(REPO_ROOT / TEST_NODES_DIR,) if tiny else ())
    server = ComfyServer(config)
    t_start = time.monotonic()
    try:
        with server:
            report["server_start_s"] = round(time.monotonic() - t_start, 2)
            api = ui_to_api(ui, server.object_info())
            files = required_model_files(api)
            if args.models:
                check_real_models(files, models_dir)
            else:  # ComfyUI re-lists a model folder when it changes, so files made now are seen
                ensure_synthetic(files, size, "cuda" if on_gpu else "cpu", models_dir)
                report["synthetic_size"] = size
            if tiny:  # tiny text encoders need a loader that passes their shrunken config
                report["tiny_text_encoder_loaders"] = use_tiny_text_encoders(api)
            overrides = dict(CPU_DEFAULTS) if (not on_gpu and size == "tiny") else {}
            overrides.update({k: v for k, v in (("width", args.width), ("height", args.height),
                                                ("steps", args.steps)) if v})
            apply_overrides(api, overrides)
            report["overrides"] = overrides
            client = f"lowvram-{uuid.uuid4().hex[:8]}"
            with PeakSampler(server.proc.pid) as peak, \
                    ProgressListener(server.url, client, on_progress=_print_progress) as listener:
                t0 = time.monotonic()
                prompt_id = server.queue(api, client_id=client)
                entry = server.wait(prompt_id, timeout_s=args.timeout)
                report["prompt_s"] = round(time.monotonic() - t0, 2)
                time.sleep(0.3)  # let the last websocket events arrive
                report["stages_s"] = {k: round(v, 2) for k, v in listener.stage_times(api).items()}
                images = collect_images(entry, base / "output", out_dir)
        report["peak_memory"] = {"kind": peak.kind, "peak_gib": round(peak.peak_bytes / 2**30, 3),
                                 "baseline_gib": round(peak.baseline_bytes / 2**30, 3)}
        report["images"] = [str(p) for p in images]
        report["total_s"] = round(time.monotonic() - t_start, 2)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
        return report
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _print_progress(data: dict) -> None:
    value, total = data.get("value", 0), data.get("max", 1)
    width = 30
    filled = int(width * value / max(total, 1))
    print(f"\r[lowvram] sampling [{'#' * filled}{'.' * (width - filled)}] {value}/{total}", end="", flush=True)
    if value >= total:
        print(flush=True)


def collect_images(entry: dict, server_output: Path, out_dir: Path) -> list[Path]:
    saved = []
    for node_out in entry.get("outputs", {}).values():
        for img in node_out.get("images", []):
            if img.get("type") != "output":
                continue
            src = server_output / img.get("subfolder", "") / img["filename"]
            dst = out_dir / img["filename"]
            shutil.copyfile(src, dst)
            saved.append(dst)
    if not saved:
        raise MainError("the workflow finished but saved no image (does it end in a SaveImage node?)")
    return saved


def print_report(report: dict) -> None:
    print("\n=== LowVRAM Kit run report ===")
    print(f"workflow      {report['workflow']}  (ComfyUI {report['comfyui']}, {report['device']}"
          + (f", synthetic {report['synthetic_size']} models" if "synthetic_size" in report else "") + ")")
    if report.get("overrides"):
        print(f"scaled down   {report['overrides']}  (CPU run; pass --width/--height/--steps to change)")
    print(f"server start  {report['server_start_s']:.1f} s")
    for stage, secs in report.get("stages_s", {}).items():
        print(f"{stage:<13} {secs:.1f} s")
    print(f"prompt total  {report['prompt_s']:.1f} s")
    pm = report["peak_memory"]
    print(f"peak memory   {pm['peak_gib']:.2f} GiB ({pm['kind']}; {pm['baseline_gib']:.2f} GiB before the prompt)")
    for img in report["images"]:
        print(f"image         {img}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/run.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--workflow", default=DEFAULT_WORKFLOW, help="a name from workflows/ or a path to a UI .json")
    p.add_argument("--models", help="a ComfyUI models folder with the real files (default: synthetic models)")
    p.add_argument("--size", choices=("tiny", "full"), help="synthetic model size (default: full on a GPU, tiny on CPU)")
    p.add_argument("--out", default=str(REPO_ROOT / "output"), help="where images and report.json go")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the prompt")
    p.add_argument("--front-end-root", help="frontend folder for machines without the frontend package")
    p.add_argument("--list", action="store_true", help="list the shipped workflows and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(available_workflows()))
        return 0
    try:
        print_report(run(args))
        return 0
    except (MainError, ServerError, WorkflowError, ComfyNotFoundError) as e:
        print(f"\n[lowvram] error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:  # an unknown synthetic model name from the registry
        print(f"\n[lowvram] error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
