"""Listen to a ComfyUI server's websocket: which node runs when, and sampler progress.

Runs aiohttp's websocket client (a ComfyUI requirement, so always present) in a daemon thread and keeps
time-stamped events; `stage_times()` turns them into seconds per stage for the main command's report.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

# Which stage a node class belongs to, by name pattern (first match wins).
STAGE_BY_CLASS = (
    ("Loader", "loading"),
    ("Float8DiT", "loading"),
    ("CLIPTextEncode", "text encoding"),
    ("TextEncode", "text encoding"),
    ("Sampler", "sampling"),
    ("KSampler", "sampling"),
    ("VAEDecode", "decoding"),
    ("Save", "saving"),
)


def stage_of(class_type: str) -> str:
    return next((stage for pattern, stage in STAGE_BY_CLASS if pattern in class_type), "other")


class ProgressListener:
    def __init__(self, url: str, client_id: str, on_progress=None):
        self.ws_url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        self.events: list[tuple[float, str, dict]] = []
        self.on_progress = on_progress
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        self._ready.wait(timeout=10)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.run(self._listen())

    async def _listen(self) -> None:
        import aiohttp  # ComfyUI's own dependency

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.ws_url, heartbeat=20) as ws:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            return
                        continue  # binary preview images
                    data = json.loads(msg.data)
                    event = (time.monotonic(), data.get("type", ""), data.get("data", {}))
                    self.events.append(event)
                    if self.on_progress and event[1] == "progress":
                        self.on_progress(event[2])

    def stage_times(self, api_graph: dict) -> dict[str, float]:
        """Seconds per stage: each node's time runs from its 'executing' event to the next one."""
        marks = [(t, d.get("node")) for t, kind, d in self.events if kind == "executing"]
        totals: dict[str, float] = {}
        for (t0, node), (t1, _) in zip(marks, marks[1:]):
            if node is None:
                continue
            stage = stage_of(api_graph.get(str(node), {}).get("class_type", ""))
            totals[stage] = totals.get(stage, 0.0) + (t1 - t0)
        return totals
