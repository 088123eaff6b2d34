"""The same graph without the pack: a shipped workflow (API format) rewritten to ComfyUI core nodes.

Issue #8 measures each workflow beside "ComfyUI core running the same graph without the pack". The
rewrite is a table, node class -> what core does instead:
- Float8DiTLoader -> UNETLoader with weight_dtype fp8_e4m3fn (core's own fp8: no scales, upcast per layer),
- NewBieDiTLoader -> UNETLoader "default" (core 0.3.75 loads NewBie as Lumina-2 and drops the Jina
  pooled weights; it times the same DiT),
- ChunkedOffloadUNet, VRAMGuard, FlashAttnToggle, ChunkedOffloadTextEncoder -> removed (their consumers take
  their model or clip input),
- LazyVAEDecode -> VAEDecode.
NewBie's text-encoder and prompt nodes have no core equivalent in 0.3.75 and stay (they run the same code
in both graphs). Links in API format are [node_id, output_index]; every node removed here has one output
that passes its `model` (or `clip`) input through, so a link to it becomes that input's link.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

CORE_FP8 = "fp8_e4m3fn"


def _unet_loader(dtype: str) -> Callable[[dict], dict]:
    def rewrite(node: dict) -> dict:
        name = node["inputs"].get("model_name", node["inputs"].get("unet_name"))
        return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": dtype},
                "_meta": {"title": f"UNETLoader ({dtype})"}}
    return rewrite


def _vae_decode(node: dict) -> dict:
    return {"class_type": "VAEDecode", "inputs": {"samples": node["inputs"]["samples"], "vae": node["inputs"]["vae"]},
            "_meta": {"title": "VAEDecode"}}


REPLACE: dict[str, Callable[[dict], dict]] = {
    "Float8DiTLoader": _unet_loader(CORE_FP8),
    "NewBieDiTLoader": _unet_loader("default"),
    "LazyVAEDecode": _vae_decode,
}
PASS_THROUGH = {"ChunkedOffloadUNet": "model", "VRAMGuard": "model", "FlashAttnToggle": "model",
                "ChunkedOffloadTextEncoder": "clip"}


def _resolve(link, removed: dict[str, list]) -> list:
    # Follow a link through removed pass-through nodes (they may be chained) to the node that stays.
    while isinstance(link, list) and str(link[0]) in removed:
        link = removed[str(link[0])]
    return link


def bypass(api: dict, pass_through: dict[str, str], replace: dict[str, Callable[[dict], dict]] | None = None) -> dict:
    """A new API graph without the nodes of `pass_through` (class -> the input it passes on), their consumers
    linked to that input, and each node of `replace` rewritten by its function."""
    graph = copy.deepcopy(api)
    removed = {nid: node["inputs"][pass_through[node["class_type"]]]
               for nid, node in graph.items() if node["class_type"] in pass_through}
    out = {}
    for nid, node in graph.items():
        if nid in removed:
            continue
        node = (replace or {}).get(node["class_type"], lambda n: n)(node)
        node["inputs"] = {k: _resolve(v, removed) for k, v in node["inputs"].items()}
        out[nid] = node
    return out


def to_core(api: dict) -> dict:
    """A new API graph with the pack's nodes replaced as the module docstring says."""
    return bypass(api, PASS_THROUGH, REPLACE)


def pack_nodes_left(api: dict, pack_classes: set[str]) -> list[str]:
    """Class names of the pack still in a graph (NewBie's text nodes are expected; anything else is a bug)."""
    return sorted({n["class_type"] for n in api.values() if n["class_type"] in pack_classes})
