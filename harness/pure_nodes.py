"""Import the ComfyUI-free modules of nodes/ (e.g. nodes/_tiling.py) in tests, without ComfyUI.

The repository's `nodes` package shares its name with ComfyUI's nodes.py, so tests load it under another
name: `lowvram_pure_nodes`. Only modules that import no ComfyUI code can be loaded this way.

    T = pure_node("_tiling")
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

from .paths import REPO_ROOT

PACKAGE = "lowvram_pure_nodes"


def pure_node(name: str):
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, REPO_ROOT / "nodes" / "__init__.py",
                                                      submodule_search_locations=[str(REPO_ROOT / "nodes")])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACKAGE}.{name}")
