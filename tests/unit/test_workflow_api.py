"""UI -> API conversion, on a hand-made object_info that mirrors ComfyUI's schema shapes."""
import pytest

from harness.workflow_api import WorkflowError, ui_to_api
from harness.workflow_builder import GraphSpec, NodeSpec, build_ui

INFO = {
    "Loader": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
               "output": ["MODEL", "CLIP"], "output_name": ["MODEL", "CLIP"]},
    "Encode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
               "output": ["CONDITIONING"], "output_name": ["CONDITIONING"]},
    "Sampler": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"default": 0, "control_after_generate": True}],
                                       "steps": ["INT", {"default": 20}], "positive": ["CONDITIONING", {}]},
                          "optional": {"cfg": ["FLOAT", {"default": 1.0}]}},
                "output": ["LATENT"], "output_name": ["LATENT"]},
    "Patch": {"input": {"required": {"model": ["MODEL", {}], "strength": ["FLOAT", {"default": 1.0}]}},
              "output": ["MODEL"], "output_name": ["MODEL"]},
}


def graph():
    return GraphSpec(nodes=[
        NodeSpec(1, "Loader", {"ckpt_name": "b.safetensors"}),
        NodeSpec(2, "Encode", {"text": "hi"}, links={"clip": (1, 1)}),
        NodeSpec(3, "Patch", {"strength": 0.5}, links={"model": (1, 0)}),
        NodeSpec(4, "Sampler", {"seed": 7, "steps": 3, "cfg": 2.5}, links={"model": (3, 0), "positive": (2, 0)}),
    ], notes=[("note", "text", (0, 0))])


def test_round_trip_keeps_widgets_links_and_skips_notes():
    api = ui_to_api(build_ui(graph(), INFO), INFO)
    assert set(api) == {"1", "2", "3", "4"}  # the MarkdownNote is frontend-only
    assert api["4"]["inputs"] == {"seed": 7, "steps": 3, "cfg": 2.5, "model": ["3", 0], "positive": ["2", 0]}
    assert api["1"]["inputs"] == {"ckpt_name": "b.safetensors"}
    assert api["2"]["inputs"] == {"text": "hi", "clip": ["1", 1]}


def test_seed_control_value_is_skipped():
    ui = build_ui(graph(), INFO)
    sampler = next(n for n in ui["nodes"] if n["type"] == "Sampler")
    assert sampler["widgets_values"] == [7, "fixed", 3, 2.5]


def test_bypassed_node_passes_its_input_through():
    ui = build_ui(graph(), INFO)
    next(n for n in ui["nodes"] if n["type"] == "Patch")["mode"] = 4
    api = ui_to_api(ui, INFO)
    assert "3" not in api and api["4"]["inputs"]["model"] == ["1", 0]


def test_reroute_is_followed():
    ui = build_ui(graph(), INFO)
    # insert a reroute between Encode (2) and Sampler (4)
    link = next(lk for lk in ui["links"] if lk[1] == 2)
    ui["nodes"].append({"id": 9, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 99}],
                        "outputs": [{"name": "", "type": "CONDITIONING", "links": [link[0]]}]})
    ui["links"].append([99, 2, 0, 9, 0, "CONDITIONING"])
    link[1], link[2] = 9, 0
    assert ui_to_api(ui, INFO)["4"]["inputs"]["positive"] == ["2", 0]


def test_unknown_node_type_is_named():
    ui = build_ui(graph(), INFO)
    ui["nodes"][0]["type"] = "NotInstalledNode"
    with pytest.raises(WorkflowError, match="NotInstalledNode"):
        ui_to_api(ui, INFO)


def test_missing_required_link_is_named():
    ui = build_ui(graph(), INFO)
    sampler = next(n for n in ui["nodes"] if n["type"] == "Sampler")
    for inp in sampler["inputs"]:
        if inp["name"] == "positive":
            inp["link"] = None
    with pytest.raises(WorkflowError, match="node 4 .*positive"):
        ui_to_api(ui, INFO)
