"""Convert a UI-format workflow (what users save and share) into the API format /prompt executes.

The conversion follows what the ComfyUI frontend does when it queues a graph, using the server's
/object_info to learn each node's inputs, so the shipped UI files themselves are what tests run (never a
hand-kept API copy):
- widget values are positional over the node's widget inputs, in schema order (required, then optional);
  an INT input with `control_after_generate` (seeds) carries one extra UI-only value after it;
- a link overrides the widget value of the same input (a "converted" widget keeps its slot);
- frontend-only nodes (notes, reroutes, primitives) are not sent: reroutes are followed, primitives give
  their value to the widget they feed;
- mode 2 (muted) nodes are dropped, mode 4 (bypassed) nodes pass their matching input straight through.

    api = ui_to_api(json.load(open("workflows/sdxl_24gb.json")), server.object_info())
"""
from __future__ import annotations

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODE_MUTED, MODE_BYPASSED = 2, 4


class WorkflowError(ValueError):
    """The UI workflow cannot be converted; the message names the node and input."""


def _widget_inputs(spec: dict) -> list[tuple[str, dict, bool]]:
    """(name, options, has_control_value) for every widget input of a node schema, in UI order."""
    out = []
    for section in ("required", "optional"):
        for name, decl in spec.get("input", {}).get(section, {}).items():
            kind, opts = decl[0], (decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {})
            is_widget = isinstance(kind, list) or kind in WIDGET_TYPES
            if not is_widget or opts.get("forceInput"):
                continue
            control = bool(opts.get("control_after_generate")) or (
                kind == "INT" and name in ("seed", "noise_seed"))
            out.append((name, opts, control))
    return out


def _widget_values(node: dict, spec: dict) -> dict:
    values = node.get("widgets_values", [])
    widgets = _widget_inputs(spec)
    if isinstance(values, dict):
        return {name: values[name] for name, _, _ in widgets if name in values}
    result, i = {}, 0
    for name, _, control in widgets:
        if i >= len(values):
            break
        result[name] = values[i]
        i += 2 if control else 1
    return result


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Return {node_id: {"class_type", "inputs"}} for a UI workflow; raises WorkflowError on bad graphs."""
    nodes = {str(n["id"]): n for n in ui.get("nodes", [])}
    links = {link[0]: link for link in ui.get("links", [])}  # id, from_node, from_slot, to_node, to_slot, type

    missing = sorted({n["type"] for n in nodes.values() if n["type"] not in object_info and n["type"] not in FRONTEND_ONLY})
    if missing:
        raise WorkflowError(f"the workflow uses node types this server does not have: {', '.join(missing)} "
                            "(is the pack that provides them installed and importable?)")

    def source(link_id, seen=()):
        """Follow a link back through reroutes and bypassed nodes to (node_id, slot), or None."""
        link = links.get(link_id)
        if link is None:
            return None
        node_id, slot, ltype = str(link[1]), link[2], link[5]
        node = nodes.get(node_id)
        if node is None or node_id in seen:
            return None
        if node["type"] == "Reroute":
            inp = (node.get("inputs") or [{}])[0]
            return source(inp.get("link"), seen + (node_id,))
        if node.get("mode") == MODE_BYPASSED:
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and inp.get("type") == ltype:
                    return source(inp["link"], seen + (node_id,))
            return None
        if node.get("mode") == MODE_MUTED or node["type"] == "PrimitiveNode":
            return None
        return node_id, slot

    api = {}
    for node_id, node in nodes.items():
        if node["type"] in FRONTEND_ONLY or node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        spec = object_info[node["type"]]
        inputs = _widget_values(node, spec)
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            src = source(inp["link"])
            if src is None:
                continue  # fed by a primitive/muted node: the widget value (if any) stands
            inputs[inp["name"]] = [src[0], src[1]]
        required = spec.get("input", {}).get("required", {})
        absent = [name for name in required if name not in inputs]
        if absent:
            raise WorkflowError(f"node {node_id} ({node['type']}) has no value or link for required input(s) "
                                f"{', '.join(absent)}; connect them in the workflow")
        api[node_id] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node.get("title", node["type"])}}
    return api


# Core text-encoder loaders and how their inputs map onto the test-only TinyTextEncoderLoader.
TINY_TE_SWAPS = {
    "CLIPLoader": {"clip_name": "clip_name1", "type": "type"},
    "DualCLIPLoader": {"clip_name1": "clip_name1", "clip_name2": "clip_name2", "type": "type"},
}
TEST_NODES_DIR = "tests/comfy_nodes/lowvram_test_nodes"


def use_tiny_text_encoders(api: dict) -> list[str]:
    """Swap core text-encoder loaders for TinyTextEncoderLoader (in place); returns the node ids swapped.

    Tiny synthetic text encoders record a shrunken config that only a loader passing `model_options`
    can build; ComfyUI's own loaders always build the full-size model.
    """
    swapped = []
    for node_id, node in api.items():
        mapping = TINY_TE_SWAPS.get(node["class_type"])
        if mapping is None:
            continue
        node["class_type"] = "TinyTextEncoderLoader"
        node["inputs"] = {new: node["inputs"][old] for old, new in mapping.items() if old in node["inputs"]}
        swapped.append(node_id)
    return swapped
