"""Import this repository as the ComfyUI pack it is (a package), for in-process tests and tools.

ComfyUI imports custom_nodes/<folder>/__init__.py as a package named after the folder; this does the
same under the name `lowvram_kit`, so the pack's relative imports (nodes -> quant/offload) resolve.
ComfyUI's own modules must be importable first (harness.comfy_inproc.import_comfy()).
"""
from __future__ import annotations

import importlib.util
import sys

from .paths import REPO_ROOT

PACKAGE = "lowvram_kit"


def import_pack():
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module
