"""Which live tensors hold a device's memory, and who owns them (plain PyTorch, no ComfyUI import).

For the question "ComfyUI unloaded every model, yet the server still holds 7.5 GiB: what is it?". The
census walks the garbage collector's objects once: every tensor on the device is counted once per storage
(views share it), and named by the module attribute that holds it (`Linear.weight` of `DoubleStreamBlock`
...), else by the types of the objects that refer to it. The result is plain JSON.

    >>> import torch
    >>> keep = torch.nn.Linear(256, 131)
    >>> c = tensor_census("cpu", top=10**6)   # every group: other tests' tensors may be larger than this one
    >>> c["bytes"] >= 256 * 131 * 4 and any(g["owner"] == "Linear.weight" and list(g["shape"]) == [131, 256]
    ...                                     for g in c["top"])
    True
"""
from __future__ import annotations

import gc
from collections import defaultdict
from types import FrameType

import torch


def _device_matches(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def _module_owners() -> dict[int, str]:
    """id(tensor) -> 'ModuleClass.attr' for every parameter and buffer of every live module."""
    owners: dict[int, str] = {}
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance asks the object for __class__, which proxies answer oddly
        if issubclass(type(obj), torch.nn.Module):
            kind = type(obj).__name__
            for name, t in list(obj._parameters.items()) + list(obj._buffers.items()):
                if t is not None:
                    owners.setdefault(id(t), f"{kind}.{name}")
    return owners


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    """(what identifies its memory, its bytes): the storage for plain tensors (views share it), the tensor
    itself for subclasses without a plain storage."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return id(t), t.numel() * t.element_size()


def _referrer_types(t: torch.Tensor, scanned: list, limit: int = 3) -> str:
    """What refers to a tensor that no module owns: 'dict, list' (the census' own list and frames left out)."""
    names = {type(r).__name__ for r in gc.get_referrers(t) if r is not scanned and not isinstance(r, FrameType)}
    return ", ".join(sorted(names)[:limit]) or "no referrer seen (a frame, C++ or a closure holds it)"


def tensor_census(device: str | torch.device, top: int = 10) -> dict:
    """Live tensors on `device` grouped by (owner, dtype, shape), largest first.

    Returns {"device", "bytes", "tensors", "top": [{"owner", "dtype", "shape", "count", "bytes"}...]}; bytes
    count each storage once (a view of a counted storage adds nothing)."""
    device = torch.device(device)
    gc.collect()
    owners = _module_owners()
    objects = gc.get_objects()
    try:
        storages: set[int] = set()
        groups: dict[tuple[str, str, tuple[int, ...]], list[int]] = defaultdict(lambda: [0, 0])
        total = count = unreadable = 0
        for obj in objects:
            if not issubclass(type(obj), torch.Tensor):
                continue
            try:
                if not _device_matches(obj, device):
                    continue
                key, nbytes = _storage_key(obj)
                shape, dtype = tuple(obj.shape), str(obj.dtype).replace("torch.", "")
            except Exception:  # noqa: BLE001  (a tensor subclass that answers oddly must not stop the census)
                unreadable += 1
                continue
            if key in storages or nbytes == 0:
                continue
            storages.add(key)
            owner = owners.get(id(obj)) or _referrer_types(obj, objects)
            g = groups[(owner, dtype, shape)]
            g[0] += 1
            g[1] += nbytes
            total += nbytes
            count += 1
    finally:
        del objects
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "device": str(device),
        "bytes": total,
        "tensors": count,
        "unreadable_tensors": unreadable,
        "top": [{"owner": o, "dtype": d, "shape": list(s), "count": c, "bytes": b} for (o, d, s), (c, b) in ranked],
    }


def allocator_bytes(device: str | torch.device) -> dict:
    """PyTorch's caching allocator on a CUDA device: allocated (live tensors) and reserved (cached too), and
    how the reserved bytes sit in segments (segment_summary)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    out = {"allocated": int(torch.cuda.memory_allocated(device)), "reserved": int(torch.cuda.memory_reserved(device))}
    try:
        out["allocator_backend"] = torch.cuda.get_allocator_backend()
        out["segments"] = segment_summary(torch.cuda.memory_snapshot(), torch.cuda.current_device()
                                          if device.index is None else device.index)
    except (RuntimeError, AttributeError) as e:   # cudaMallocAsync keeps no segment table
        out["segments"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def segment_summary(snapshot: list[dict], device_index: int) -> dict:
    """Reserved memory that empty_cache cannot give back: segments kept by a few live blocks.

    The caching allocator returns a segment to the driver only when no block in it is live, so one small
    tensor that outlives a prompt (a cache, a leaked reference) can hold a weight-sized segment. `snapshot` is
    torch.cuda.memory_snapshot(): [{"device", "stream", "total_size", "allocated_size", ...}].

    >>> segment_summary([{"device": 0, "stream": 0, "total_size": 100, "allocated_size": 2},
    ...                  {"device": 0, "stream": 7, "total_size": 50, "allocated_size": 0}], 0)["held_by_few_live_bytes"]
    98
    """
    mine = [seg for seg in snapshot if seg.get("device") == device_index]
    partly = [seg for seg in mine if 0 < seg["allocated_size"] < seg["total_size"]]
    by_stream: dict[str, int] = defaultdict(int)
    for seg in mine:
        by_stream[str(seg.get("stream", 0))] += seg["total_size"]
    return {
        "count": len(mine),
        "reserved_bytes": sum(seg["total_size"] for seg in mine),
        "free_segments_bytes": sum(seg["total_size"] for seg in mine if seg["allocated_size"] == 0),
        "partly_used": len(partly),
        # free bytes inside segments that a live block keeps from being released
        "held_by_few_live_bytes": sum(seg["total_size"] - seg["allocated_size"] for seg in partly),
        "reserved_by_stream": dict(by_stream),
    }
