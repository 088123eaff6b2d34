"""VRAMGuard's peak-memory estimator: what one prompt's sampling and decode stages will take on the device.

Pure arithmetic (no ComfyUI): the adapter measures the model (bytes, largest layer, placement of its
weights) and the job (latent shape, batch, CFG, text tokens), this module turns them into bytes.

    w = Workload(family="flux", batch=1, latent_h=128, latent_w=128, text_tokens=256, cfg_batch=1,
                 weight_bytes=23_802_816_640, largest_layer_params=66_060_288)
    e = estimate(w, Placement.full(w.weight_bytes))
    e.sampling_bytes / GiB      # 23.04: weights 22.17 + activations 0.42 + allocator/workspace 0.45

Model of the sampling peak (NVML "used" above the level before the prompt):
    resident weights + transfer/cast buffers            (how the weights are placed: Placement)
  + activations = bytes_per_token x tokens x images run together (batch, x2 when cond and uncond batch)
  + cast copy of the largest layer when storage is narrower than compute (fp8 weights, bf16 matmul)
  + a fixed reserve: cuBLAS workspaces, lazily loaded kernels, caching-allocator slack (larger when
    weights stream: buffers of many sizes cycle through the allocator)
The decode peak: VAE weights + bytes per output pixel x pixels per decode call + the fp32 image
buffer + the same reserve.

Calibration: CALIBRATION below names the result file each constant came from. Until
bench/vramguard_calibrate.py has run on a GPU, Flux comes from the ComfyUI-core anchor run
(bench/results/comfy_core_flux_anchor_nvidia-h200_2026-11-21T0611.json, 1024x1024, batch 1, cfg 1)
and the other families from the CPU measurements of ../shared/research/models.md section 4, scaled
by Flux's GPU/CPU ratio; those rows say so in `Estimate.notes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

GiB = 1 << 30
MiB = 1 << 20

# Flux-dev 1024x1024, batch 1 (anchor JSON above): torch max_memory_allocated minus loaded weights is
# 0.4223 GiB in every bf16 row, resident or partially loaded, over 4096 image + 256 text tokens.
FLUX_BYTES_PER_TOKEN = 0.4223 * GiB / 4352
# The same rows on the CPU (models.md 4.2): 0.55 GiB bf16. GPU/CPU = 0.77 scales the CPU-only families.
GPU_OVER_CPU = 0.4223 / 0.55
FLUX_PARAMS = 11_901_408_320


@dataclass(frozen=True)
class Profile:
    """Per-family constants. Activations are per image at 2-byte compute (bf16/fp16)."""
    bytes_per_token: float
    tokens_per_latent_px: float      # 1/4 for 2x2 patches (DiTs); 1 for a UNet (a "token" = a latent px)
    counts_text_tokens: bool         # joint attention over image + text tokens (Flux, Next-DiT)
    default_text_tokens: int         # when the conditioning does not say
    source: str                      # where the constant came from (shown to the user)
    calibrated_on_gpu: bool = False
    # The caching allocator keeps about one more activation-sized set reserved (NVML sees it, torch's
    # allocated counter does not): the reserve is then max(the fixed reserve, the activations).
    slack_follows_activations: bool = False


PROFILES: dict[str, Profile] = {
    # Flux's torch-allocated activations match this constant from 512 to 1536 px and batch 1 to 4, but NVML
    # minus torch allocated grew with them: 0.14, 0.43, 0.82, 1.63, 1.83 and 3.72 GiB for 0.12, 0.42, 0.84,
    # 1.69, 1.84 and 3.68 GiB of activations (bench/results/vramguard_calibration_nvidia-h200_2026-11-21T1709
    # .json), hence slack_follows_activations (the 1536 px batch 4 rows were 11-20% low without it).
    "flux": Profile(FLUX_BYTES_PER_TOKEN, 0.25, True, 256,
                    "bench/results/comfy_core_flux_anchor_nvidia-h200_2026-11-21T0611.json (1024 px, batch 1); "
                    "allocator slack from vramguard_calibration_nvidia-h200_2026-11-21T1709.json",
                    calibrated_on_gpu=True, slack_follows_activations=True),
    # NewBie: measured on an H200 (bench/results/vramguard_calibration_nvidia-h200_2026-11-21T0750.json):
    # NVML peak minus bf16 weights and the reserve is 0.148-0.182 GiB per 1000 tokens (batch x cfg x
    # (image + 512 text tokens)) from 512 to 1536 px, batch 1 to 4; 0.175 fits every row within 4%.
    "newbie": Profile(0.175 * GiB / 1000, 0.25, True, 512,
                      "bench/results/vramguard_calibration_nvidia-h200_2026-11-21T0750.json (512-1536 px, "
                      "batch 1-4)", calibrated_on_gpu=True),
    "lumina2": Profile(0.175 * GiB / 1000, 0.25, True, 512,
                       "as NewBie (same Next-DiT width), not measured on a GPU itself"),
    # Z-Image: 0.3-0.5 GiB bf16 at batch 1, L ~ 4400 (models.md 4.2 arithmetic).
    "z-image": Profile(0.4 * GiB / 4400 * GPU_OVER_CPU, 0.25, True, 256,
                       "models.md 4.2 arithmetic (0.3-0.5 GiB at 1024 px), not yet measured on a GPU"),
    # SDXL: 0.3-0.6 GiB at cfg batch 2, 1024 px = 2 x 16384 latent px (models.md 4.2).
    "sdxl": Profile(0.45 * GiB / (2 * 16384), 1.0, False, 77,
                    "models.md 4.2 estimate (0.3-0.6 GiB at 1024 px, cfg batch 2), not yet measured on a GPU"),
}

# Fixed reserve above weights + activations, NVML peak minus torch max_memory_allocated in the anchor:
# 0.433 (bf16) / 0.473 (fp8) GiB fully resident; 0.74-0.97 GiB (mean 0.87) when ComfyUI partially loads
# and casts layers through its offload streams.
RESERVE_RESIDENT = int(0.45 * GiB)
RESERVE_OFFLOADED = int(0.87 * GiB)
# fp8 storage, bf16 compute: allocated above the weights is 0.57 GiB vs 0.42 for bf16 (anchor), i.e.
# 1.2 x the largest layer (single_blocks.*.linear1, 21504 x 3072) in bf16.
CAST_COPIES = 1.2
# VAE decode (Flux AE / SDXL VAE, 8x), measured on an H200 in two runs (bench/results/vramguard_calibration_
# nvidia-h200_2026-11-21T0750.json and T0805, identical peaks): 0.93, 3.24, 7.06, 12.38 and 25.37 GiB for
# 0.26, 1.05, 2.36, 4.19 and 9.44 megapixels per call, both VAEs alike. The peak is linear in the pixels of
# one call: VAE weights + the fp32 output + DECODE_RESERVE + VAE_BYTES_PER_OUT_PX x pixels, fitted for the
# smallest worst-case error over all of them: every row within 4.2% (the earlier one-point fit at 1024 px
# with the sampling reserve put the 512 px decode 36% high).
VAE_BYTES_PER_OUT_PX = 2.895 * GiB / (1024 * 1024)   # bf16 VAE; scaled by vae_dtype_bytes / 2
DECODE_RESERVE = int(0.08 * GiB)                      # what a decode adds beyond weights, working set, output
VAE_PARAMS = 83_819_683
MIN_TILE_PX = 256

CALIBRATION = {
    "activations": {f: p.source for f, p in PROFILES.items()},
    "reserve": "bench/results/comfy_core_flux_anchor_nvidia-h200_2026-11-21T0611.json (NVML - torch allocated)",
    "cast_copies": "same file: fp8 rows vs bf16 rows, allocated above loaded weights",
    "vae_decode": "bench/results/vramguard_calibration_nvidia-h200_2026-11-21T0750.json and T0805 (0.26-9.4 MP "
                  "per call, both VAEs; two-constant fit)",
    "unknown_models": "Flux's bytes per token scaled by sqrt(parameters / Flux's), tokens = latent px / 4",
}

PLACEMENTS = ("full", "comfy_partial", "streamed", "cpu")


@dataclass(frozen=True)
class Placement:
    """Where the diffusion model's weights are while it samples.

    kind: full (all on the device), comfy_partial (ComfyUI's lowvram loading: the rest is cast per layer
    through its offload streams), streamed (ChunkedOffloadUNet), cpu (no device memory).
    resident_bytes: weights that stay on the device; buffer_bytes: transfer slots / cast buffers;
    floor_bytes: the least resident + buffers this placement can shrink to (for adapt).
    """
    kind: str
    resident_bytes: int
    buffer_bytes: int = 0
    floor_bytes: int = 0

    def __post_init__(self):
        if self.kind not in PLACEMENTS:
            raise ValueError(f"Placement.kind {self.kind!r} is not one of {', '.join(PLACEMENTS)}")
        for name in ("resident_bytes", "buffer_bytes", "floor_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"Placement.{name} must be >= 0, got {getattr(self, name)}")

    @staticmethod
    def full(weight_bytes: int) -> "Placement":
        return Placement("full", weight_bytes, 0, weight_bytes)

    @property
    def device_weight_bytes(self) -> int:
        return self.resident_bytes + self.buffer_bytes

    @property
    def offloaded(self) -> bool:
        return self.kind in ("comfy_partial", "streamed")


@dataclass(frozen=True)
class Workload:
    """One sampling job. Sizes in latent pixels; bytes as stored."""
    family: str                       # a key of PROFILES, or anything else for "unknown"
    batch: int
    latent_h: int
    latent_w: int
    weight_bytes: int                 # all diffusion-model weights, in their storage dtype
    params: int = 0                   # parameter count (for unknown families); 0 = weight_bytes / 2
    text_tokens: int = 0              # 0 = the family default
    cfg_batch: int = 1                # 2 when cond and uncond run together (cfg != 1)
    compute_bytes: int = 2            # bytes per element of the compute dtype
    storage_bytes: float = 2.0        # average bytes per weight element as stored
    largest_layer_params: int = 0     # for the cast copy of fp8 weights
    fp8_matmul: bool = False          # fp8 weights multiplied as fp8 (no bf16 copy of the layer)
    upscale: int = 8                  # VAE output px per latent px
    vae_dtype_bytes: int = 2
    decode_on_device: bool = True     # False: the decode is not counted (another device decodes)

    def __post_init__(self):
        for name in ("batch", "latent_h", "latent_w", "cfg_batch", "compute_bytes", "upscale", "vae_dtype_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"Workload.{name} must be >= 1, got {getattr(self, name)}")
        if self.cfg_batch > 2:
            raise ValueError(f"Workload.cfg_batch must be 1 or 2, got {self.cfg_batch}")
        for name in ("weight_bytes", "params", "text_tokens", "largest_layer_params"):
            if getattr(self, name) < 0:
                raise ValueError(f"Workload.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def known(self) -> bool:
        return self.family in PROFILES

    @property
    def out_px(self) -> int:
        return self.latent_h * self.latent_w * self.upscale ** 2


@dataclass(frozen=True)
class Estimate:
    sampling_bytes: int
    decode_bytes: int
    components: dict = field(default_factory=dict)   # name -> bytes, for the report
    rough: bool = False
    notes: tuple[str, ...] = ()

    @property
    def peak_bytes(self) -> int:
        return max(self.sampling_bytes, self.decode_bytes)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.components.items() if v)
        return (f"predicted peak {self.peak_bytes / GiB:.2f} GiB (sampling {self.sampling_bytes / GiB:.2f}, "
                f"decode {self.decode_bytes / GiB:.2f}; GiB: {parts})" + (" [rough]" if self.rough else ""))


def tokens(w: Workload) -> float:
    """Tokens one image puts through the model: image tokens (+ text tokens for joint attention)."""
    prof = PROFILES.get(w.family)
    if prof is None:   # unknown: assume a 2x2-patch DiT with joint text tokens
        return w.latent_h * w.latent_w / 4 + (w.text_tokens or 256)
    text = (w.text_tokens or prof.default_text_tokens) if prof.counts_text_tokens else 0
    return w.latent_h * w.latent_w * prof.tokens_per_latent_px + text


def bytes_per_token(w: Workload) -> float:
    prof = PROFILES.get(w.family)
    if prof is not None:
        return prof.bytes_per_token
    params = w.params or w.weight_bytes / 2
    # Activation width grows with the hidden size, ~ sqrt(parameters) at a fixed depth/width ratio.
    return FLUX_BYTES_PER_TOKEN * math.sqrt(max(params, 1) / FLUX_PARAMS)


def activation_bytes(w: Workload, images: int | None = None) -> int:
    """Activations of `images` images run together (default: the batch x cfg_batch)."""
    n = w.batch * w.cfg_batch if images is None else images
    return int(bytes_per_token(w) * tokens(w) * n * w.compute_bytes / 2)


def cast_bytes(w: Workload) -> int:
    """bf16 copy of the largest layer when the weights are stored narrower (fp8) than computed."""
    if w.storage_bytes >= w.compute_bytes or w.fp8_matmul:
        return 0
    return int(CAST_COPIES * w.largest_layer_params * w.compute_bytes)


def decode_bytes(w: Workload, tile_px: int = 0, images_per_call: int | None = None,
                 reserve: int = DECODE_RESERVE, budget_bytes: int | None = None) -> int:
    """VAE decode peak: weights + working set of one call + the fp32 [B, 3, H, W] output buffer + reserve.

    images_per_call None: as many whole images as fit `budget_bytes` (ComfyUI's VAE Decode and LazyVAEDecode
    both batch by free memory), at least 1; the whole batch when no budget is given. Tiles: one per call.
    """
    if not w.decode_on_device:
        return 0
    fixed = VAE_PARAMS * w.vae_dtype_bytes + w.batch * 3 * w.out_px * 4 + reserve
    per_px = VAE_BYTES_PER_OUT_PX * w.vae_dtype_bytes / 2
    if tile_px:
        n, px = 1, min(w.out_px, tile_px * tile_px)
    else:
        px = w.out_px
        n = w.batch if images_per_call is None else max(1, min(images_per_call, w.batch))
        if images_per_call is None and budget_bytes is not None:
            n = max(1, min(w.batch, int((budget_bytes - fixed) // (per_px * px))))
    return int(fixed + per_px * px * n)


def reserve_bytes(p: Placement) -> int:
    if p.kind == "cpu":
        return 0
    return RESERVE_OFFLOADED if p.offloaded else RESERVE_RESIDENT


def estimate(w: Workload, p: Placement, batch_chunk: int | None = None, tile_px: int = 0,
             decode_budget: int | None = None) -> Estimate:
    """Peak bytes of the sampling and decode stages for `w` with weights placed as `p`.

    batch_chunk: images sampled per sequential run (None: the whole batch at once).
    tile_px: decode tile side in output px (0: whole images, as many per call as fit `decode_budget`).
    """
    chunk = w.batch if batch_chunk is None else max(1, min(batch_chunk, w.batch))
    notes = []
    prof = PROFILES.get(w.family)
    if prof is None:
        notes.append(f"unknown model family {w.family!r}: activations estimated from the parameter count "
                     f"({(w.params or w.weight_bytes // 2) / 1e9:.2f} B); the estimate is rough")
    elif not prof.calibrated_on_gpu:
        notes.append(f"{w.family}: activation constant from {prof.source}")
    # On the CPU the weights are in host RAM before the prompt starts: only activations add to it.
    on_device = p.kind != "cpu"
    comps = {
        "weights": p.resident_bytes if on_device else 0,
        "buffers": p.buffer_bytes if on_device else 0,
        "activations": activation_bytes(w, chunk * w.cfg_batch),
        "cast": cast_bytes(w),
        "reserve": reserve_bytes(p),
    }
    if on_device and prof is not None and prof.slack_follows_activations:
        comps["reserve"] = max(comps["reserve"], comps["activations"])
    sampling = sum(comps.values())
    dec = decode_bytes(w, tile_px, reserve=DECODE_RESERVE if on_device else 0, budget_bytes=decode_budget)
    comps["decode"] = dec
    return Estimate(int(sampling), int(dec), comps, rough=prof is None, notes=tuple(notes))


def comfy_partial_resident(free_bytes: int, weight_bytes: int, minimum_required_bytes: int,
                           minimum_inference_bytes: int, min_weight_ratio: float = 0.0) -> int:
    """Weights ComfyUI 0.3.x keeps on the device when it loads a model into `free_bytes`.

    Its rule (model_management.load_models_gpu): max(0, free - minimum required,
    min(free x MIN_WEIGHT_MEMORY_RATIO, free - minimum inference memory)), capped by the model size;
    `minimum_required_bytes` is its minimum_memory_required: the larger of its activation estimate for
    the batch and its minimum inference memory, plus its reserved VRAM.

    >>> round(comfy_partial_resident(16 * GiB, 22 * GiB, int(1.4 * GiB), int(1.2 * GiB)) / GiB, 2)
    14.6
    """
    budget = max(0, free_bytes - minimum_required_bytes,
                 min(int(free_bytes * min_weight_ratio), free_bytes - minimum_inference_bytes))
    return int(min(weight_bytes, budget))


def largest_tile_px(w: Workload, available_bytes: int) -> int:
    """Largest decode tile side (multiple of 64 px, >= MIN_TILE_PX) whose decode fits, one image per call."""
    fixed = decode_bytes(w, tile_px=1) - int(VAE_BYTES_PER_OUT_PX * w.vae_dtype_bytes / 2)
    per_px = VAE_BYTES_PER_OUT_PX * w.vae_dtype_bytes / 2
    room = max(0, available_bytes - fixed)
    side = int(math.sqrt(room / per_px)) // 64 * 64 if per_px else 0
    return max(MIN_TILE_PX, side)
