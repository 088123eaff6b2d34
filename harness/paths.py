"""Where things live: the repository, its caches, and the ComfyUI tree the harness runs.

Nothing here imports ComfyUI; it only finds it.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache"
PACK_FOLDER_NAME = "lowvram-kit"  # the folder name ComfyUI-Manager gives the pack under custom_nodes/
PINNED_COMFY_VERSION = "0.3.75"


class ComfyNotFoundError(RuntimeError):
    """No usable ComfyUI tree; the message says how to provide one."""


def find_comfyui() -> Path:
    """The ComfyUI tree to use: $COMFYUI_PATH, else the copy scripts/bootstrap.sh made.

    >>> find_comfyui().joinpath("main.py").is_file()
    True
    """
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise ComfyNotFoundError(
                f"COMFYUI_PATH={env} is not a ComfyUI tree (it needs main.py and comfy/). "
                "Set COMFYUI_PATH to the folder that holds ComfyUI's main.py, or unset it and run "
                "scripts/bootstrap.sh to get ComfyUI 0.3.75."
            )
        return path
    default = CACHE_DIR / f"ComfyUI-{PINNED_COMFY_VERSION}"
    if (default / "main.py").is_file():
        return default
    raise ComfyNotFoundError(
        "No ComfyUI found. Run scripts/bootstrap.sh (it fetches ComfyUI 0.3.75 into .cache/), or set "
        "COMFYUI_PATH to an existing ComfyUI folder, e.g. export COMFYUI_PATH=~/ComfyUI"
    )


def comfy_version(comfy_path: Path) -> str:
    """The version string from comfyui_version.py, or 'unknown'."""
    text = (comfy_path / "comfyui_version.py").read_text() if (comfy_path / "comfyui_version.py").exists() else ""
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"
