"""VRAMGuard: predict a prompt's peak VRAM before sampling, adapt or refuse, retry out-of-memory errors,
and report the measured peak and time per stage."""
from __future__ import annotations

import logging

from ._vram_policy import POLICIES, GuardSettings
from ._vram_run import prompt_started
from .comfy_vram_guard import guard_model

GiB = 1 << 30
log = logging.getLogger("lowvram")


class VRAMGuard:
    DESCRIPTION = (
        "Before sampling, predicts the peak VRAM of this model at this resolution, batch and CFG (weights that "
        "stay loaded + activations + workspaces + the VAE decode) and compares it with what the GPU has free "
        "(NVML, other programs counted). adapt: keeps fewer weights resident, samples a batch in smaller runs "
        "or asks LazyVAEDecode to tile, and says what it changed; warn: runs and warns; fail_fast: stops with "
        "the numbers and what to change. An out-of-memory error while sampling is caught, memory freed, the "
        "plan shrunk and the sampling repeated from the same noise. After the run a report (peak and time "
        "per stage, timeline plot) appears on this node, in the server log and as JSON in output/vramguard.")
    CATEGORY = "lowvram/utils"
    FUNCTION = "guard"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model whose sampling VRAMGuard plans, retries and reports.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to guard (any; Flux, Next-DiT/NewBie, SDXL and "
                                           "Z-Image have calibrated estimates, others a rough one)."}),
            "budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.25, "tooltip":
                          "GiB of VRAM this prompt may use. 0 = what the card has free now (other programs "
                          "counted), plus what ComfyUI can unload."}),
            "headroom_gb": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 64.0, "step": 0.1, "tooltip":
                            "GiB kept free below the budget for the estimate's error and other programs. "
                            "0 = none (not advised)."}),
            "policy": (list(POLICIES), {"default": "adapt", "tooltip":
                       "When the prediction does not fit: adapt = change the plan (fewer resident weights, "
                       "batch in runs, tiled decode) and say so; warn = run as is and warn; fail_fast = stop "
                       "before sampling with the numbers."}),
            "oom_retries": ("INT", {"default": 2, "min": 0, "max": 16, "tooltip":
                            "Times an out-of-memory error during sampling is retried with a smaller plan "
                            "(0 = never)."}),
            "report": ("BOOLEAN", {"default": True, "tooltip":
                       "Watch memory every 10 ms during the prompt and show the peak and time per stage with a "
                       "timeline plot (also saved as JSON and PNG in output/vramguard)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, *, report=True, unique_id=None, **widgets):
        # ComfyUI calls this when every prompt holding the node starts: the memory timeline starts here, so
        # text encoding and loading before sampling are measured. The value is constant: caching is unaffected.
        try:
            prompt_started(unique_id, bool(report))
        except Exception as e:  # noqa: BLE001  (an error here would make ComfyUI re-run the node every time)
            log.warning("LowVRAM Kit VRAMGuard: the memory timeline could not start at prompt start (%s: %s); "
                        "it starts with sampling instead", type(e).__name__, e)
        return ""

    def guard(self, model, budget_gb, headroom_gb, policy, oom_retries, report, unique_id=None):
        settings = GuardSettings(budget_bytes=int(round(budget_gb * GiB)), headroom_bytes=int(round(headroom_gb * GiB)),
                                 policy=policy, oom_retries=int(oom_retries), report=bool(report))
        clone, _session = guard_model(model, settings, None if unique_id is None else str(unique_id))
        return (clone,)
