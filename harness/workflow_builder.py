"""Write UI-format workflow JSON (the format users load in ComfyUI) from a compact graph description.

The shipped files in workflows/ are made with this, against a running server's /object_info, so sockets,
link arrays and widget order match exactly what the frontend expects. The files are then the source of
truth: tests convert them back with workflow_api.ui_to_api.

    spec = GraphSpec(nodes=[
        NodeSpec(1, "CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}),
        NodeSpec(2, "CLIPTextEncode", {"text": "a cat"}, links={"clip": (1, 1)}), ...])
    ui = build_ui(spec, object_info)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .workflow_api import _widget_inputs

COLUMN_PX, ROW_PX = 340, 220


@dataclass(frozen=True)
class NodeSpec:
    id: int
    type: str
    widgets: dict = field(default_factory=dict)  # input name -> value (defaults fill the rest)
    links: dict = field(default_factory=dict)  # input name -> (source node id, output slot)
    title: str | None = None
    pos: tuple[int, int] | None = None
    properties: dict = field(default_factory=dict)
    size: tuple[int, int] = (315, 120)


@dataclass(frozen=True)
class GraphSpec:
    nodes: list
    notes: list = field(default_factory=list)  # (title, markdown text, (x, y))


def _default(opts: dict, kind) -> object:
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind, None)


def build_ui(spec: GraphSpec, object_info: dict) -> dict:
    nodes_out, links_out = [], []
    by_id = {n.id: n for n in spec.nodes}
    consumers: dict[tuple[int, int], list[int]] = {}
    link_id = 0
    link_of: dict[tuple[int, str], int] = {}
    for n in spec.nodes:
        info = object_info[n.type]
        for name, (src, slot) in n.links.items():
            if src not in by_id:
                raise ValueError(f"node {n.id} links input {name!r} to unknown node {src}")
            link_id += 1
            out_type = object_info[by_id[src].type]["output"][slot]
            links_out.append([link_id, src, slot, n.id, None, out_type])  # to_slot filled below
            consumers.setdefault((src, slot), []).append(link_id)
            link_of[(n.id, name)] = link_id

    for order, n in enumerate(spec.nodes):
        info = object_info[n.type]
        inputs, widgets_values = [], []
        widget_names = {w[0] for w in _widget_inputs(info)}
        for section in ("required", "optional"):
            for name, decl in info.get("input", {}).get(section, {}).items():
                kind = decl[0]
                if name in widget_names:
                    if (n.id, name) in link_of:  # a widget fed by a link: a socket that names its widget
                        inputs.append({"name": name, "type": "COMBO" if isinstance(kind, list) else kind,
                                       "widget": {"name": name}, "link": link_of[(n.id, name)]})
                elif (n.id, name) in link_of or section == "required":
                    inputs.append({"name": name, "type": kind, "link": link_of.get((n.id, name))})
        for name, opts, control in _widget_inputs(info):
            kind = next(d[0] for s in ("required", "optional") for k, d in info["input"].get(s, {}).items() if k == name)
            widgets_values.append(n.widgets.get(name, _default(opts, kind)))
            if control:
                widgets_values.append("fixed")
        unknown = set(n.widgets) - widget_names
        if unknown:
            raise ValueError(f"node {n.id} ({n.type}) has no widget(s) {sorted(unknown)}")
        for slot_index, inp in enumerate(inputs):
            if inp.get("link") is not None:
                links_out[inp["link"] - 1][4] = slot_index
        outputs = [{"name": name, "type": typ, "slot_index": i, "links": consumers.get((n.id, i), [])}
                   for i, (name, typ) in enumerate(zip(info["output_name"], info["output"]))]
        pos = n.pos or (40 + COLUMN_PX * (order // 3), 40 + ROW_PX * (order % 3))
        node = {"id": n.id, "type": n.type, "pos": list(pos), "size": list(n.size), "flags": {}, "order": order,
                "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": n.type, **n.properties}, "widgets_values": widgets_values}
        if n.title:
            node["title"] = n.title
        nodes_out.append(node)

    next_id = max(by_id) + 1
    for title, text, (x, y) in spec.notes:
        nodes_out.append({"id": next_id, "type": "MarkdownNote", "pos": [x, y], "size": [420, 260], "flags": {},
                          "order": len(nodes_out), "mode": 0, "inputs": [], "outputs": [], "title": title,
                          "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        next_id += 1
    return {"last_node_id": next_id - 1, "last_link_id": link_id, "nodes": nodes_out, "links": links_out,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}
