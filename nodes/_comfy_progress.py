"""ComfyUI adapter: a plain progress callback (quant's `progress(done, total)`) as ComfyUI shows it."""
from __future__ import annotations

import comfy.model_management
import comfy.utils


class LoadProgress:
    """The running node's progress bar, and a cancelled prompt stopping the work at the next call (ComfyUI's
    InterruptProcessingException): long loads show progress and can be cancelled between two tensors."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total)
        self.bar.update_absolute(done, total)
