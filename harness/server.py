"""A real ComfyUI server, started headless with this pack linked in, driven over its HTTP API.

Used by the integration tests, the main command (harness.main) and the benchmark. The server runs in its
own process from the ComfyUI tree (find_comfyui()); everything it writes lives under one base directory
(`--base-directory`: custom_nodes/, user/, input/, output/, temp/), so the ComfyUI tree stays untouched.

    with ComfyServer(ServerConfig(base_dir=tmp, models_dirs=(models,), cpu=True)) as server:
        prompt_id = server.queue(api_graph)
        entry = server.wait(prompt_id, timeout_s=600)
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .paths import PACK_FOLDER_NAME, REPO_ROOT, find_comfyui

# ComfyUI's model folders, as the models-folder layout names them (newer names first).
MODEL_FOLDERS = {
    "checkpoints": ["checkpoints"],
    "diffusion_models": ["diffusion_models", "unet"],
    "text_encoders": ["text_encoders", "clip"],
    "vae": ["vae"],
    "loras": ["loras"],
}


class ServerError(RuntimeError):
    """The server could not start, died, or rejected/failed a prompt; the message carries its log tail."""


@dataclass(frozen=True)
class ServerConfig:
    base_dir: Path
    models_dirs: tuple[Path, ...] = ()
    cpu: bool = True
    port: int = 0  # 0 = pick a free one
    extra_args: tuple[str, ...] = ()
    python: str = sys.executable
    launcher: tuple[str, ...] = ()  # arguments between python and main.py (bench.stack_sampler.launcher())
    comfy_path: Path | None = None
    front_end_root: Path | None = None  # the GPU machine has no frontend package: pass a folder
    extra_node_dirs: tuple[Path, ...] = ()  # more custom-node folders to link in (test-only nodes)
    startup_timeout_s: float = 240.0
    env: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def write_model_paths_yaml(path: Path, models_dirs: tuple[Path, ...]) -> Path:
    """An extra_model_paths.yaml that maps each models folder (ComfyUI layout) into the server."""
    lines = []
    for i, root in enumerate(models_dirs):
        lines.append(f"lowvram_models_{i}:")
        lines.append(f"  base_path: {json.dumps(str(Path(root).resolve()))}")
        for kind, subdirs in MODEL_FOLDERS.items():
            lines.append(f"  {kind}: |")
            lines.extend(f"    {d}" for d in subdirs)
    path.write_text("\n".join(lines) + "\n")
    return path


class ComfyServer:
    """Start/stop a headless ComfyUI and talk to it. Use as a context manager."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.comfy_path = config.comfy_path or find_comfyui()
        self.port = config.port or free_port()
        self.base_dir = Path(config.base_dir).resolve()
        self.log_path = self.base_dir / "server.log"
        self.proc: subprocess.Popen | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> "ComfyServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _prepare_base_dir(self) -> None:
        for sub in ("custom_nodes", "user", "input", "output", "temp"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        targets = {PACK_FOLDER_NAME: REPO_ROOT, **{Path(d).name: Path(d).resolve() for d in self.config.extra_node_dirs}}
        for name, target in targets.items():
            link = self.base_dir / "custom_nodes" / name
            if link.is_symlink() or link.exists():
                if link.resolve() != target:
                    raise ServerError(f"{link} exists and is not a link to {target}; remove it or use another base dir")
            else:
                link.symlink_to(target, target_is_directory=True)

    def command(self) -> list[str]:
        cfg = self.config
        cmd = [cfg.python, *cfg.launcher, str(self.comfy_path / "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch",
               "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}"]
        if cfg.cpu:
            cmd.append("--cpu")
        if cfg.models_dirs:
            yaml = write_model_paths_yaml(self.base_dir / "extra_model_paths.yaml", cfg.models_dirs)
            cmd += ["--extra-model-paths-config", str(yaml)]
        if cfg.front_end_root:
            cmd += ["--front-end-root", str(Path(cfg.front_end_root).resolve())]  # ComfyUI runs in its own cwd
        return cmd + list(cfg.extra_args)

    def start(self) -> None:
        if self.config.port and port_in_use(self.config.port):
            raise ServerError(f"port {self.config.port} is in use on 127.0.0.1; pass another --port or 0 for a free one")
        self._prepare_base_dir()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.config.env}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), cwd=self.comfy_path, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} while starting.\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        else:
            self.stop()
            raise ServerError(f"ComfyUI did not answer within {self.config.startup_timeout_s:.0f} s.\n{self.log_tail()}")
        self.check_pack_imported()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def check_pack_imported(self) -> None:
        """Fail if ComfyUI reported our pack as IMPORT FAILED (it keeps running when a pack fails)."""
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "IMPORT FAILED" in line and PACK_FOLDER_NAME in line:
                raise ServerError(f"ComfyUI could not import the pack: {line.strip()}\n{self.log_tail()}")

    # ---- HTTP ------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:  # noqa: S310 (loopback only)
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (loopback only)
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise ServerError(f"POST {path} was rejected ({e.code}): {body[:4000]}") from None

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=120)

    def queue(self, api_graph: dict, client_id: str = "lowvram-harness") -> str:
        return self.post("/prompt", {"prompt": api_graph, "client_id": client_id})["prompt_id"]

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def free(self, unload_models: bool = True) -> None:
        self.post("/free", {"unload_models": unload_models, "free_memory": True})

    def wait(self, prompt_id: str, timeout_s: float = 1800, poll_s: float = 0.25, on_poll=None) -> dict:
        """Poll /history until the prompt finished; return its history entry or raise with the error."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI died (code {self.proc.returncode}) while running the prompt.\n{self.log_tail()}")
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error" or not status.get("completed"):
                    raise ServerError(f"the prompt failed: {describe_error(status)}\n{self.log_tail()}")
                return entry
            if on_poll:
                on_poll()
            time.sleep(poll_s)
        raise ServerError(f"the prompt did not finish within {timeout_s:.0f} s.\n{self.log_tail()}")


def describe_error(status: dict) -> str:
    """The execution_error message from a history status, in one line."""
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message', '').strip()}"
        if kind == "execution_interrupted":
            return "interrupted"
    return json.dumps(status)[:2000]
