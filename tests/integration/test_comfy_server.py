"""The pack inside a real headless ComfyUI 0.3.75 (CPU): it imports, registers, and shipped workflows run."""
import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT
from harness.server import ComfyServer, ServerConfig, ServerError
from harness.workflow_api import ui_to_api

pytestmark = pytest.mark.server
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))


def registered_node_ids() -> list[str]:
    """The node ids from __init__.py, read statically as ComfyUI-Manager's scanner does."""
    tree = ast.parse((REPO_ROOT / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "NODE_CLASS_MAPPINGS" for t in node.targets):
            assert isinstance(node.value, ast.Dict), "NODE_CLASS_MAPPINGS must be a literal dict"
            return [ast.literal_eval(k) for k in node.value.keys]
    raise AssertionError("__init__.py defines no NODE_CLASS_MAPPINGS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ComfyServer(ServerConfig(base_dir=tmp_path_factory.mktemp("comfy-base"))) as srv:
        yield srv


def test_pack_imports_and_registers_its_nodes(server):
    server.check_pack_imported()
    log = server.log_path.read_text()
    assert "lowvram-kit" in log  # ComfyUI's import-times list names every custom node folder it loaded
    info = server.object_info()
    for node_id in registered_node_ids():
        assert node_id in info, f"{node_id} is in NODE_CLASS_MAPPINGS but not in /object_info"
        assert info[node_id]["category"].startswith("lowvram"), node_id


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_shipped_workflow_converts_against_the_real_schemas(server, path):
    api = ui_to_api(json.loads(path.read_text()), server.object_info())
    assert any(n["class_type"] == "SaveImage" for n in api.values())


def test_bad_prompt_is_rejected_with_the_node_named(server):
    graph = {"1": {"class_type": "VAEDecode", "inputs": {}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    with pytest.raises(ServerError, match="rejected .*VAEDecode|rejected .*required"):
        server.queue(graph)


def test_port_in_use_is_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {port} is in use"):
            ComfyServer(ServerConfig(base_dir=tmp_path, port=port)).start()


def test_failed_start_shows_the_log(tmp_path):
    cfg = ServerConfig(base_dir=tmp_path, extra_args=("--no-such-flag",))
    with pytest.raises(ServerError, match="exited with code") as err:
        ComfyServer(cfg).start()
    assert "unrecognized arguments" in str(err.value)


def run_main(*args, env=None, timeout=1500):
    return subprocess.run([sys.executable, "-m", "harness.main", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_main_command_writes_an_image_and_a_report(tmp_path):
    out = tmp_path / "out"
    res = run_main("--workflow", "sdxl_24gb", "--out", str(out), "--steps", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["images"] and all(Path(p).stat().st_size > 1000 for p in report["images"])
    assert report["stages_s"].get("sampling", 0) > 0 and report["peak_memory"]["peak_gib"] > 0
    assert "LowVRAM Kit run report" in res.stdout


def test_main_command_bad_inputs_have_clear_messages(tmp_path):
    res = run_main("--workflow", "no_such_workflow")
    assert res.returncode == 2 and "shipped workflows: " in res.stderr
    res = run_main("--workflow", "sdxl_24gb", env={"COMFYUI_PATH": str(tmp_path)})
    assert res.returncode == 2 and "COMFYUI_PATH" in res.stderr and "main.py" in res.stderr
    res = run_main("--workflow", "sdxl_24gb", "--models", str(tmp_path))
    assert res.returncode == 2 and "sd_xl_base_1.0.safetensors not found" in res.stderr
