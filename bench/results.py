"""Result files: one JSON per benchmark run in bench/results/, with everything needed to trust it later.

A result holds `environment` (GPU, driver, CUDA, torch, ComfyUI, python, date, git commit, command)
and `rows` (one dict per measured configuration). Absolute seconds mean something only beside the GPU
named in the same file.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SCHEMA_VERSION = 1


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def command_line(argv: list[str] | None = None) -> str:
    """The exact command, runnable from the repo root: `python -m bench.anchor --smoke`."""
    argv = sys.argv if argv is None else argv
    head = [Path(sys.executable).name]
    if argv and argv[0].endswith(".py") and "bench" in Path(argv[0]).parts:
        head += ["-m", "bench." + Path(argv[0]).stem]
        argv = argv[1:]
    return shlex.join(head + list(argv))


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """HEAD's hash plus "-dirty" when tracked files differ; None outside a git checkout or before the
    first commit. LOWVRAM_GIT_COMMIT, when set, wins: the device machine's copy of the tree may carry a
    repository state older than the tree (2026-11-21 T2248/T2257 read e91c649-dirty), so gpu_round.sh is
    started with the commit the caller sent."""
    if os.environ.get("LOWVRAM_GIT_COMMIT"):
        return os.environ["LOWVRAM_GIT_COMMIT"]

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)
    try:
        head = git("rev-parse", "--verify", "-q", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def comfyui_version(comfyui_path: str | os.PathLike | None) -> str | None:
    """ComfyUI's `__version__` read from comfyui_version.py (no import: that would start ComfyUI)."""
    if not comfyui_path:
        return None
    try:
        text = (Path(comfyui_path) / "comfyui_version.py").read_text()
    except OSError:
        return None
    m = re.search(r'__version__\s*=\s*["\']([^"\']+)["\']', text)
    return m.group(1) if m else None


def host_environment(comfyui_path: str | os.PathLike | None) -> dict:
    """What the orchestrating process knows without touching the GPU."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "comfyui_path": str(comfyui_path) if comfyui_path else None,
        "comfyui_version": comfyui_version(comfyui_path),
        "git_commit": git_commit(),
        "date": utc_now(),
        "command": command_line(),
    }


def device_environment(device) -> dict:
    """GPU name, driver, CUDA and torch versions, read inside the process that runs the workload."""
    import torch
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           "device_name": None, "device_total_bytes": None, "driver": None}
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_total_bytes=props.total_memory,
                   compute_capability=f"{props.major}.{props.minor}")
        from .nvml_peak import nvml_device_index
        env.update(_nvml_facts(nvml_device_index(device)))
    else:
        env["device_name"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


def _nvml_facts(index: int) -> dict:
    """Driver version and PCIe link (host<->device bandwidth decides offload speed), if NVML answers."""
    try:
        import pynvml   # lazy: optional dependency (nvidia-ml-py)
    except ImportError:
        return {"nvml_note": "pynvml (nvidia-ml-py) not installed"}
    facts = {}
    queries = {"driver": lambda h: pynvml.nvmlSystemGetDriverVersion(),
               "pcie_gen_max": pynvml.nvmlDeviceGetMaxPcieLinkGeneration,
               "pcie_width_max": pynvml.nvmlDeviceGetMaxPcieLinkWidth,
               "pcie_gen_current": pynvml.nvmlDeviceGetCurrPcieLinkGeneration,
               "pcie_width_current": pynvml.nvmlDeviceGetCurrPcieLinkWidth}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return {"nvml_note": f"NVML unavailable ({e})"}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        for key, query in queries.items():
            try:
                v = query(handle)
                facts[key] = v.decode() if isinstance(v, bytes) else v
            except pynvml.NVMLError as e:   # virtualised GPUs refuse some queries
                facts[key] = f"unavailable ({e})"
    finally:
        pynvml.nvmlShutdown()
    return facts


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write atomically (temp file + rename) so a run killed mid-write leaves the previous version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"schema_version": SCHEMA_VERSION, **payload}, indent=1, sort_keys=False)
                   + "\n")
    os.replace(tmp, path)
    return path


def slug(text: str) -> str:
    """File-name-safe form of a device name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"
