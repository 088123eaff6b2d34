"""GET /lowvram/memory on ComfyUI's server: what holds the GPU now, beside what ComfyUI thinks is loaded.

    curl 'http://127.0.0.1:8188/lowvram/memory?top=10'

Answers {"device", "allocated", "reserved", "loaded_models": [{"model", "loaded_bytes"}...], "loaded_bytes",
"tensors": {census of live tensors on the device, largest groups first, each named by its owner},
"unaccounted_bytes": live tensor bytes beyond what loaded models account for}. After /free with models
unloaded, a large `unaccounted_bytes` is a leak, and `tensors.top` says whose. The census walks every live
Python object (about a second on a server with big models): a diagnostic to call now and then, not a poll.
"""
from __future__ import annotations

import logging

import comfy.model_management as mm

from ._memory_census import allocator_bytes, tensor_census

log = logging.getLogger("lowvram")
PATH = "/lowvram/memory"
MAX_TOP = 100


def loaded_models() -> list[dict]:
    """ComfyUI's current_loaded_models, as (model class, device bytes it counts as loaded)."""
    rows = []
    for loaded in list(mm.current_loaded_models):
        patcher = loaded.model  # a weak reference's target: None once the patcher was collected
        if patcher is None:
            continue
        size = patcher.loaded_size() if hasattr(patcher, "loaded_size") else patcher.model_size()
        rows.append({"model": type(patcher.model).__name__, "loaded_bytes": int(size)})
    return rows


def memory_report(top: int = 10) -> dict:
    device = mm.get_torch_device()
    models = loaded_models()
    census = tensor_census(device, top=top)
    accounted = sum(m["loaded_bytes"] for m in models)
    return {"device": str(device), **allocator_bytes(device), "loaded_models": models, "loaded_bytes": accounted,
            "tensors": census, "unaccounted_bytes": max(0, census["bytes"] - accounted)}


def register() -> bool:
    """Add the route to ComfyUI's running PromptServer; False where there is none (tests, scripts)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False

    @instance.routes.get(PATH)
    async def memory(request):
        try:
            top = min(max(int(request.query.get("top", 10)), 1), MAX_TOP)
        except ValueError:
            return web.json_response({"error": f"top must be an integer from 1 to {MAX_TOP}, "
                                               f"got {request.query.get('top')!r}"}, status=400)
        try:
            return web.json_response(memory_report(top))
        except Exception as e:  # noqa: BLE001  (a diagnostic answers with its error; the server goes on)
            log.exception("LowVRAM Kit: /lowvram/memory failed")
            return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=500)

    return True
