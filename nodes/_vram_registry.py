"""The one contact between VRAMGuard and the pack's other nodes: the guarded prompt now running, if any.

A node that wants its work to appear in the guard's report, or to honour the guard's requests, needs
two lines and no import of the guard itself (nothing happens when no guard is active):

    from . import _vram_registry as guard
    with guard.stage("decoding"):                    # LazyVAEDecode: the decode's peak and time
        cap = guard.decode_request()                 # None, or DecodeRequest(tile_px, max_bytes, why)
        guard.note({"kind": "decode", ...})          # what it did, as an event in the guard's report
    guard.timing("streaming attached", 2.1)          # where time went, in the report's timings
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

_lock = threading.Lock()
_active = None        # the GuardRun of the prompt being guarded (comfy_vram_guard.GuardRun)


@dataclass(frozen=True)
class DecodeRequest:
    tile_px: int          # tile side in output px the guard asks for (0: no request)
    max_bytes: int        # device bytes the decode may use (0: no limit)
    why: str


def activate(run) -> None:
    global _active
    with _lock:
        _active = run


def deactivate(run) -> None:
    global _active
    with _lock:
        if _active is run:
            _active = None


def active():
    with _lock:
        return _active


@contextmanager
def stage(name: str):
    """Mark `name` in the active guard's timeline for the duration of the block (no-op without one)."""
    run = active()
    if run is None:
        yield None
        return
    run.begin_stage(name)
    try:
        yield run
    finally:
        run.end_stage(name)


def decode_request() -> DecodeRequest | None:
    run = active()
    return None if run is None else run.decode_request()


def note(event: dict) -> None:
    """Add `event` ({"kind": ..., more fields}) to the active guard's report (no-op without one)."""
    run = active()
    if run is not None:
        run.note(event)


def timing(what: str, seconds: float, **details) -> None:
    """Add where time went ("streaming attached", 2.1 s, ...) to the active guard's report (no-op without one)."""
    run = active()
    if run is not None:
        run.timing(what, seconds, **details)
