"""Streams and events per device type, so the streamer's logic is one code path.

On "cuda" these are torch.cuda streams and events. On "cpu" (the tests' device) every copy is
synchronous host memory traffic, so streams and events have nothing to order and are no-ops;
the slot protocol (which group is in which slot, when a slot may be refilled) still runs.
Nothing here touches CUDA until a CUDA backend's method is called.
"""

from __future__ import annotations

import contextlib

import torch


class _NoEvent:
    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _NoStream:
    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


class HostBackend:
    """device.type == "cpu": copies finish before copy_() returns."""

    non_blocking = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_stream(self) -> _NoStream:
        return _NoStream()

    def new_event(self) -> _NoEvent:
        return _NoEvent()

    def current_stream(self) -> _NoStream:
        return _NoStream()

    def on_stream(self, stream) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        pass


class CudaBackend:
    """device.type == "cuda": one side stream for copies, events between it and compute."""

    # Copies from pinned memory return at once and run on the copy engine; from pageable memory
    # CUDA stages them through a driver buffer and the call returns when the data is staged.
    non_blocking = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(device=self.device)

    def new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def current_stream(self) -> torch.cuda.Stream:
        # The stream the model computes on: ComfyUI may run on a non-default stream.
        return torch.cuda.current_stream(self.device)

    def on_stream(self, stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


BACKENDS = {"cpu": HostBackend, "cuda": CudaBackend}


def backend_for(device: torch.device):
    try:
        return BACKENDS[device.type](device)
    except KeyError:
        raise ValueError(
            f"offload: device type {device.type!r} is not supported; use one of {sorted(BACKENDS)}"
        ) from None
