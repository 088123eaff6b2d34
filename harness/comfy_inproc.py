"""Import ComfyUI's own modules into this process (for tests and tools; no server).

Where ComfyUI is: $COMFYUI_PATH, else <repo>/.cache/ComfyUI-<version> (what scripts/bootstrap.sh puts
there). By default its folder is appended to sys.path: the `comfy` package needs nothing else, and this
repo's own `nodes` package stays importable. ComfyUI's top-level modules (`nodes.py`, `folder_paths`,
comfy_extras) expect it first on sys.path, as main.py has it: pass first=True for those.

CPU: comfy.model_management picks its device once, at import, from comfy.cli_args.args (parsed from
an empty argv unless comfy.options.enable_args_parsing() was called), so `args.cpu` must be set
before that first import.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

COMFYUI_VERSION = "0.3.75"
REPO_ROOT = Path(__file__).resolve().parents[1]
MODULES = ("comfy.model_management", "comfy.utils", "comfy.sd", "comfy.model_detection",
           "comfy.supported_models", "comfy.model_base", "comfy.ops", "comfy.model_patcher")


def comfyui_path() -> Path:
    """The ComfyUI tree to use; raises FileNotFoundError saying how to get one."""
    env = os.environ.get("COMFYUI_PATH")
    path = Path(env) if env else REPO_ROOT / ".cache" / f"ComfyUI-{COMFYUI_VERSION}"
    if not (path / "comfy" / "sd.py").is_file():
        source = "$COMFYUI_PATH" if env else "the default location"
        raise FileNotFoundError(f"no ComfyUI tree at {path} ({source}): run scripts/bootstrap.sh, or set "
                                "COMFYUI_PATH to the folder holding ComfyUI's main.py")
    return path.resolve()


def import_comfy(cpu: bool = True, first: bool = False) -> SimpleNamespace:
    """ComfyUI's modules as attributes: sd, model_detection, supported_models, model_management, ...

    >>> comfy = import_comfy()                      # doctest: +SKIP
    >>> comfy.sd.load_diffusion_model(path)         # doctest: +SKIP
    """
    root = str(comfyui_path())
    if first and sys.path[:1] != [root]:
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)
    elif root not in sys.path:
        sys.path.append(root)
    if cpu:
        mm = sys.modules.get("comfy.model_management")
        if mm is None:
            from comfy.cli_args import args
            args.cpu = True
        elif mm.get_torch_device().type != "cpu":
            raise RuntimeError(f"comfy.model_management was already imported for {mm.get_torch_device()} in "
                               "this process; import_comfy(cpu=True) must run before anything imports it")
    mods = {name.removeprefix("comfy."): importlib.import_module(name) for name in MODULES}
    return SimpleNamespace(root=Path(root), **mods)
