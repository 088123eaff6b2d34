"""VRAMGuard inside ComfyUI: an OUTER_SAMPLE wrapper that predicts, decides and retries, a PREPARE_SAMPLING
wrapper that makes ComfyUI load within the chosen cap, and a per-prompt run that monitors and reports.

One sampling call (`GuardSession.outer_sample`):
1. pre-flight: measure the job (noise shape, conds, CFG) and the device (NVML free, what ComfyUI can
   unload), predict the peak (_vram_estimate), decide (_vram_policy): run / adapt / warn / refuse;
2. run the sampler, whole or in batch chunks, with the weights capped where the plan says so;
3. on a CUDA out-of-memory error: free (release the streamer, unload models, empty the cache), take the
   next smaller plan, and sample again from the same inputs (noise, latent and conds copied before the
   first try, so a retry computes what the first try would have), up to `oom_retries` times;
4. always: restore what was changed (streaming settings, ComfyUI's reserved VRAM) and drop the copies.
The run's monitor keeps sampling after the sampler returns, so a decode that follows shows in the
timeline; the report is written when a decode marked through _vram_registry ends, when the next
guarded sampling starts, or TAIL_S seconds after sampling, whichever comes first.
"""
from __future__ import annotations

import logging
import time

import torch

import comfy.model_management as mm
from comfy.patcher_extension import WrappersMP

from . import _vram_registry as registry
from ._vram_comfy import Placements, read_memory, reserve_vram, restore, uses_cfg, workload
from ._vram_estimate import Placement, Workload
from ._vram_policy import GuardSettings, RunPlan, after_oom, decide, gib, usable_bytes
from ._vram_report import report_text, save_report
from ._vram_run import REPORT_SUBFOLDER, GuardRun, VRAMGuardRefusal, send_to_ui, take_pending

log = logging.getLogger("lowvram")
KEY = "lowvram_vram_guard"
# The CUDA out-of-memory error (torch >= 2.5 also names it torch.OutOfMemoryError). Not ComfyUI's
# OOM_EXCEPTION: on a torch without it that is `Exception`, and every error would be "retried".
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)
__all__ = ["GuardSession", "VRAMGuardRefusal", "guard_model"]


class GuardSession:
    """Installed on one clone (shared by its later clones through `attachments`)."""

    def __init__(self, settings: GuardSettings, node_id: str | None = None):
        self.settings, self.node_id = settings, node_id
        self.run: GuardRun | None = None
        self.cap: int | None = None          # plain ComfyUI model: device bytes its weights may keep
        self.reserve_extra = 0
        self.last_report: dict | None = None

    def install(self, patcher) -> None:
        patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, self.outer_sample)
        patcher.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, KEY, self.prepare_sampling)
        patcher.attachments[KEY] = self

    # ---- wrappers ------------------------------------------------------------------------------------
    def prepare_sampling(self, executor, model, noise_shape, conds, *args, **kwargs):
        """ComfyUI loads the model here: within the cap (its reserved VRAM raised for the duration)."""
        if self.cap is not None and model.load_device.type == "cuda" and model.loaded_size() > self.cap:
            model.partially_unload(model.offload_device, model.loaded_size() - self.cap)
        t0 = time.perf_counter()
        try:
            with reserve_vram(self.reserve_extra):
                return executor(model, noise_shape, conds, *args, **kwargs)
        finally:
            if self.run is not None:    # what loading took inside the sampling stage (the report's timings)
                self.run.timing("model loaded", time.perf_counter() - t0)

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None, **kwargs):
        guider = executor.class_obj
        patcher = guider.model_patcher
        if self.run is not None:
            self.run.finish("finished")
        monitor = take_pending(self.node_id, patcher.load_device) if self.settings.report else None
        run = self.run = GuardRun(self, patcher.load_device, self.meta(patcher), monitor)
        token, status = None, "finished"
        try:
            t0 = time.perf_counter()
            ctx = self.preflight(guider, noise, latent_image, kwargs)
            run.decision = ctx["decision"]
            run.timing("prediction", time.perf_counter() - t0)
            inputs = (noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
            out, token = self.sample_with_retries(executor, guider, ctx, inputs, kwargs)
            return out
        except VRAMGuardRefusal:
            status = "refused"
            raise
        except OOM_ERRORS:
            status = "out of memory"
            raise
        except mm.InterruptProcessingException:
            status = "cancelled"
            raise
        except BaseException:
            status = "error"
            raise
        finally:
            restore(token)
            self.cap, self.reserve_extra = None, 0
            if status == "finished":
                run.after_sampling()
            else:
                run.finish(status)
                mm.soft_empty_cache()

    # ---- steps ---------------------------------------------------------------------------------------
    def meta(self, patcher) -> dict:
        s = self.settings
        return {"model": type(patcher.model.diffusion_model).__name__, "device": str(patcher.load_device),
                "policy": s.policy, "budget_gib": s.budget_bytes / (1 << 30) if s.budget_bytes else "free",
                "headroom_gib": s.headroom_bytes / (1 << 30), "oom_retries": s.oom_retries}

    def preflight(self, guider, noise, latent_image, kwargs) -> dict:
        try:
            return self.predict(guider, noise, latent_image, kwargs)
        except VRAMGuardRefusal:
            raise
        except Exception as e:  # noqa: BLE001  (the guard's own measuring must never stop a prompt ComfyUI can run)
            log.warning("LowVRAM Kit VRAMGuard: no prediction for this sampling (%s: %s); it runs as set up, with "
                        "out-of-memory retries only", type(e).__name__, e)
            self.run.events.append({"kind": "no prediction", "error": f"{type(e).__name__}: {e}"})
            b = noise.shape[0]
            w = Workload(family="unknown", batch=b, latent_h=1, latent_w=1, weight_bytes=0)
            conds = getattr(guider, "conds", {}) or {}
            return {"decision": None, "plan": RunPlan(b), "workload": w, "placements": None,
                    "placement_for": lambda cap, images_per_run=None: Placement("cpu", 0), "suggestion": "",
                    "split_ok": can_split(noise, latent_image, conds, kwargs)}

    def predict(self, guider, noise, latent_image, kwargs) -> dict:
        patcher, conds = guider.model_patcher, getattr(guider, "conds", {}) or {}
        mem = read_memory(patcher.load_device)
        usable, notes = usable_bytes(self.settings, mem)
        cfg2 = uses_cfg(guider, conds)
        b = noise.shape[0]
        card = mem.free_bytes + mem.reclaimable_bytes
        placements = Placements(patcher, tuple(noise.shape), b * (2 if cfg2 else 1), card)
        p0 = placements.placement_for(None)
        # ComfyUI runs cond and uncond together when its estimate x 1.5 fits what is free (_calc_cond_batch)
        cfg_batch = 2 if cfg2 and placements.comfy_activation * 1.5 < usable - p0.device_weight_bytes else 1
        w = workload(patcher, tuple(noise.shape), conds, cfg_batch)
        split_ok = can_split(noise, latent_image, conds, kwargs)
        d = decide(w, placements.placement_for, self.settings, usable, split_ok, notes)
        self.run.meta.update(family=w.family, memory_source=mem.source, usable_gib=round(usable / (1 << 30), 3),
                             latent=list(noise.shape), cfg_batch=cfg_batch, placement=placements.kind)
        text = f"LowVRAM Kit VRAMGuard ({w.family}, {mem.source}): " + d.text
        (log.info if d.verdict == "fits" else log.warning)(text)
        if d.verdict == "refused":
            raise VRAMGuardRefusal(text)
        if patcher.load_device.type == "cuda":
            self.run.decode = registry.DecodeRequest(d.plan.tile_px, usable, d.text if d.plan.tile_px else "")
        return {"decision": d, "plan": d.plan, "workload": w, "placement_for": placements.placement_for,
                "placements": placements, "split_ok": split_ok, "suggestion": d.suggestion}

    def apply(self, plan, placements):
        if placements is None:
            return None
        token = placements.apply_cap(plan.weight_cap_bytes)
        if placements.kind == "comfy":
            self.cap = plan.weight_cap_bytes
            self.reserve_extra = placements.reserve_for_cap(plan.weight_cap_bytes, plan.batch_chunk)
        return token

    def sample_with_retries(self, executor, guider, ctx, inputs, kwargs):
        placements = ctx["placements"]
        plan, attempt, first_token = ctx["plan"], 0, None
        conds0 = copy_conds(getattr(guider, "conds", {}) or {})
        saved = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs[:2])
        while True:
            token = self.apply(plan, placements)
            first_token = first_token or token
            try:
                with self.run.stage("sampling" if attempt == 0 else f"sampling, retry {attempt}"):
                    args = inputs if attempt == 0 else tuple(x.clone() for x in saved) + inputs[2:]
                    return run_chunks(executor, guider, conds0, plan.batch_chunk, args, kwargs), first_token
            except OOM_ERRORS as e:
                if attempt >= self.settings.oom_retries:
                    self.run.events.append({"kind": "oom", "attempt": attempt + 1, "change": "gave up"})
                    raise OOM_ERRORS[0](f"VRAMGuard: out of memory on attempt {attempt + 1} of "
                                  f"{self.settings.oom_retries + 1} ({plan.describe(inputs[0].shape[0])}). "
                                  f"{ctx['suggestion'] or 'Lower the resolution or batch, or raise oom_retries.'} "
                                  f"First error: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
                attempt += 1
                free_after_oom(guider.model_patcher)
                plan, change = after_oom(plan, ctx["workload"], ctx["placement_for"], ctx["split_ok"])
                self.run.events.append({"kind": "oom", "attempt": attempt, "change": change,
                                        "error": str(e).splitlines()[0] if str(e) else type(e).__name__})
                log.warning("LowVRAM Kit VRAMGuard: out of memory while sampling (%s); retry %d of %d with %s",
                            str(e).splitlines()[0] if str(e) else "no message", attempt, self.settings.oom_retries,
                            change)

    # ---- report --------------------------------------------------------------------------------------
    def deliver(self, report: dict, result, decision) -> None:
        self.last_report = report
        text = report_text(report)
        log.info("%s", text)
        if not self.settings.report:
            return
        try:
            import folder_paths
            out = folder_paths.get_output_directory()
            budget = decision.usable_bytes if decision is not None else None
            predicted = decision.estimate.peak_bytes if decision is not None else None
            paths = save_report(report, f"{out}/{REPORT_SUBFOLDER}", result, budget, predicted)
        except (ImportError, OSError) as e:
            log.warning("LowVRAM Kit VRAMGuard: the report was not saved (%s: %s)", type(e).__name__, e)
            paths = {"json": None, "png": None}
        send_to_ui(self.node_id, report, text, paths)


def copy_conds(conds: dict) -> dict:
    """What CFGGuider.sample does before each sampling: fresh lists of shallow-copied cond dicts."""
    return {k: [c.copy() for c in v] for k, v in conds.items()}


def can_split(noise, latent_image, conds: dict, kwargs) -> bool:
    """A batch can run in chunks when every per-image input has that batch (not nested, not batched conds)."""
    b = noise.shape[0]
    shapes = kwargs.get("latent_shapes")
    if b < 2 or getattr(noise, "is_nested", False) or (shapes is not None and len(shapes) > 1):
        return False
    if not isinstance(latent_image, torch.Tensor) or latent_image.shape[0] != b:
        return False
    for cs in conds.values():
        for c in cs:
            t = c.get("cross_attn")
            if isinstance(t, torch.Tensor) and t.shape[0] > 1:
                return False
    return True


def run_chunks(executor, guider, conds0: dict, chunk: int, args, kwargs):
    noise, latent, sampler, sigmas, mask, callback, disable_pbar, seed = args
    b = noise.shape[0]
    if chunk >= b:
        guider.conds = copy_conds(conds0)
        return executor(noise, latent, sampler, sigmas, mask, callback, disable_pbar, seed, **kwargs)
    outs = []
    for i in range(0, b, chunk):
        part = slice(i, min(b, i + chunk))
        guider.conds = copy_conds(conds0)
        m = mask[part] if isinstance(mask, torch.Tensor) and mask.shape[0] == b else mask
        kw = dict(kwargs)
        if kw.get("latent_shapes") is not None:
            kw["latent_shapes"] = [latent[part].shape]
        outs.append(executor(noise[part], latent[part], sampler, sigmas, m, callback, disable_pbar, seed, **kw))
    return torch.cat(outs)


def free_after_oom(patcher) -> None:
    """Release everything a retry may need: the block streamer, every loaded model, torch's cache."""
    session = patcher.attachments.get("lowvram_block_streaming")
    if session is not None:
        session.detach("VRAMGuard: out of memory, re-planning")
    mm.unload_all_models()
    mm.soft_empty_cache()


def guard_model(model, settings: GuardSettings, node_id: str | None = None):
    """A clone of `model` whose sampling VRAMGuard predicts, adapts, retries and reports."""
    clone = model.clone()
    session = GuardSession(settings, node_id)
    session.install(clone)
    log.info("LowVRAM Kit VRAMGuard: policy %s, budget %s, headroom %s, %d OOM retries", settings.policy,
             gib(settings.budget_bytes) if settings.budget_bytes else "what is free", gib(settings.headroom_bytes),
             settings.oom_retries)
    return clone, session
