"""One guarded prompt's memory watch: the monitor started when the prompt begins (PendingRun), the run of
one sampling call and what follows it (GuardRun), and the delivery of the report to the UI.

ComfyUI contact: its device (model_management) and, when ComfyUI's server is running, PromptServer's
events; the report itself is built by _vram_report.py.
"""
from __future__ import annotations

import logging
import sys
import threading
from contextlib import contextmanager

import comfy.model_management as mm

from . import _vram_registry as registry
from ._vram_monitor import Monitor, MemoryReader
from ._vram_report import build_report

log = logging.getLogger("lowvram")
TAIL_S = 10.0           # how long the monitor watches after sampling when no decode marks its end
PENDING_S = 600.0       # a monitor started at prompt start waits this long for its sampler
REPORT_SUBFOLDER = "vramguard"
BEFORE = "before sampling (text encoding, loading)"


class VRAMGuardRefusal(RuntimeError):
    """fail_fast: the prediction does not fit; the message has the numbers and what to change."""


class PendingRun:
    """A monitor started when a prompt holding a VRAMGuard node begins (ComfyUI calls the node's IS_CHANGED
    then), so what runs before sampling -- text encoding, loading -- is in the timeline. The node's sampling
    adopts it; unadopted (the sampler's output was cached) it stops after PENDING_S or at the next prompt."""

    def __init__(self, node_id: str, device):
        self.node_id, self.device = node_id, device
        self.monitor = Monitor(MemoryReader.open(device)).start()
        self.monitor.mark(BEFORE)
        self.timer = threading.Timer(PENDING_S, discard_pending, args=(node_id, self))
        self.timer.daemon = True
        self.timer.start()
        registry.activate(self)

    def begin_stage(self, name: str) -> None:
        self.monitor.mark(name)

    def end_stage(self, name: str) -> None:
        self.monitor.mark(BEFORE)

    def decode_request(self):
        return None

    def note(self, event: dict) -> None:
        pass    # no report of its own (a sampling adopts only its monitor), and it never asks for tiles

    def timing(self, what: str, seconds: float, **details) -> None:
        pass    # likewise: timings belong to a guarded sampling's report

    def discard(self) -> None:
        self.timer.cancel()
        registry.deactivate(self)
        self.monitor.stop()


_pending: dict[str, PendingRun] = {}
_pending_lock = threading.Lock()


def prompt_started(node_id, report: bool) -> None:
    """Start watching memory for the guard node `node_id` (called at the start of every prompt)."""
    if node_id is None:
        return
    node_id = str(node_id)
    with _pending_lock:
        old = _pending.pop(node_id, None)
    if old is not None:
        old.discard()
    if report:
        run = PendingRun(node_id, mm.get_torch_device())
        with _pending_lock:
            _pending[node_id] = run


def take_pending(node_id, device) -> Monitor | None:
    """The running monitor of this node's prompt, if it watches `device`."""
    with _pending_lock:
        run = _pending.pop(str(node_id), None) if node_id is not None else None
    if run is None:
        return None
    run.timer.cancel()
    registry.deactivate(run)
    if run.device != device:
        run.monitor.stop()
        return None
    return run.monitor


def discard_pending(node_id: str, run: PendingRun) -> None:
    with _pending_lock:
        if _pending.get(node_id) is run:
            del _pending[node_id]
        else:
            return
    run.discard()


class GuardRun:
    """One guarded sampling call and what follows it: monitor, decision, events, report."""

    def __init__(self, session, device, meta: dict, monitor: Monitor | None = None):
        self.session, self.device, self.meta = session, device, meta
        self.decision, self.events, self.decode, self.timings = None, [], None, []
        if monitor is None and session.settings.report:
            monitor = Monitor(MemoryReader.open(device)).start()
        self.monitor = monitor
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.report: dict | None = None
        self.done = threading.Event()       # set once the report is delivered
        registry.activate(self)

    # ---- stages (also called by other nodes through _vram_registry) -------------------------------
    def begin_stage(self, name: str) -> None:
        self._cancel_timer()
        if self.monitor is not None and self.monitor.running:
            self.monitor.mark(name)

    def end_stage(self, name: str) -> None:
        if self.monitor is not None and self.monitor.running:
            self.monitor.end_stage()
        if name == "decoding":
            self.finish("finished")

    def decode_request(self):
        return self.decode

    def note(self, event: dict) -> None:
        with self._lock:
            if self.report is None:      # once the report is built, a late event has nowhere to go
                self.events.append(dict(event))

    def timing(self, what: str, seconds: float, **details) -> None:
        with self._lock:
            if self.report is None:
                self.timings.append({"what": what, "seconds": round(seconds, 3), **details})

    @contextmanager
    def stage(self, name: str):
        self.begin_stage(name)
        try:
            yield self
        finally:
            if self.monitor is not None and self.monitor.running:
                self.monitor.end_stage()

    def after_sampling(self) -> None:
        self.begin_stage("after sampling")
        self._timer = threading.Timer(TAIL_S, self.finish, args=("finished",))
        self._timer.daemon = True
        self._timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- the end -----------------------------------------------------------------------------------
    def finish(self, status: str) -> dict | None:
        with self._lock:
            if self.report is not None:
                return self.report
            self._cancel_timer()
            registry.deactivate(self)
            result = self.monitor.stop() if self.monitor is not None else None
            self.report = build_report(result, self.decision, self.events, self.meta, status, self.timings)
        try:
            self.session.deliver(self.report, result, self.decision)
        finally:
            self.done.set()
        return self.report


def send_to_ui(node_id, report: dict, text: str, paths: dict) -> None:
    """The report event (for a frontend extension), the text on the node, the timeline as its preview."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return
    image = None
    if paths.get("png") is not None:
        image = {"filename": paths["png"].name, "subfolder": REPORT_SUBFOLDER, "type": "output"}
    prompt_id = getattr(instance, "last_prompt_id", None)
    sid = getattr(instance, "client_id", None)       # the browser that queued the prompt (None: all)
    instance.send_sync("lowvram.vramguard.report", {"node": node_id, "prompt_id": prompt_id, "text": text,
                                                    "report": report, "image": image}, sid)
    if node_id is None:
        return
    if hasattr(instance, "send_progress_text"):      # the text under the node (ComfyUI >= 0.3.4x)
        instance.send_progress_text(text, node_id, sid)
    if image is not None:                             # the timeline as the node's preview image
        instance.send_sync("executed", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id,
                                        "output": {"images": [image], "text": [text]}}, sid)
