"""Tile planning and seamless blending for a VAE decode that must fit a memory budget (no ComfyUI here).

A 2-D VAE decoder maps a latent [B, C, h, w] to an image [B, 3, h*up, w*up]. Its working set grows with
the output area, so a decode that does not fit is cut into overlapping latent tiles, each decoded on
its own and blended back with a smooth partition of unity over the overlaps:

    req = DecodeRequest(batch=1, latent_h=128, latent_w=128, upscale=8, bytes_per_out_px=4356,
                        weight_bytes=168 << 20, free_bytes=4 << 30, mode="auto")
    plan = plan_decode(req)                        # 2x2 tiles of 68x68 latent px (544 px)
    raw, used = run_decode(latent, plan, req, Hooks(decode=lambda z, where: decoder(z)))
    # raw: [1, 3, 1024, 1024] float32; `used` is `plan` unless an OOM forced a smaller one

How the size is chosen: the decode's working set is estimated as `bytes_per_out_px` times the output
pixels of one call (ComfyUI's own per-VAE estimate gives ~2178 bytes per pixel per byte of dtype for
the 8x KL VAEs), plus the weights still to be moved. `auto` decodes whole images when that fits both
the measured free memory and `activation_cap_bytes`; beyond about 512-px tiles a GPU's convolutions
are already saturated, so a bigger working set only takes memory the diffusion model could have kept.
`max_tile_px` (what VRAMGuard asks for) limits both tile sides in auto and always, even when the whole
decode would fit.

Blending: along each axis, neighbours overlap by at least `overlap` latent pixels. Inside an overlap
the earlier tile's weight falls from 1 to 0 along a raised-cosine ramp while the later tile's rises,
so the weights of every output pixel sum to exactly 1 (tests check it). The ramp covers the central
`ramp_fraction` of the overlap: the outermost pixels of a tile, where the decoder saw zero padding
instead of real neighbours, get weight 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

GiB = 1024 ** 3
TILING_MODES = ("auto", "never", "always")
# torch >= 2.5 names it torch.OutOfMemoryError; older builds only torch.cuda.OutOfMemoryError (same class).
OOM_ERRORS: tuple[type[BaseException], ...] = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


@dataclass(frozen=True)
class TilingPolicy:
    safety: float = 0.85                    # share of the measured free memory a plan may fill
    activation_cap_bytes: int = 2 * GiB     # auto/always never plan a larger working set per call
    default_tile_px: int = 512              # "always" with tile size 0 uses at most this
    min_tile_latent: int = 8                # 64 px on an 8x VAE; an OOM below this goes to the CPU
    max_overlap_share: float = 0.25         # overlap <= tile/4: only neighbours ever overlap
    ramp_fraction: float = 0.5              # the blend ramp covers the central half of an overlap
    # cuDNN picks convolution algorithms whose workspace the allocator can still give, so a decode left
    # alone grows into all free memory. The node holds the allocator to the plan while decoding:
    # reserved-at-start + image buffer + estimate * headroom + slack (None: no cap).
    cap_headroom: float | None = 1.25
    cap_slack_bytes: int = 256 << 20

    def __post_init__(self):
        checks = {"safety": 0 < self.safety <= 1, "activation_cap_bytes": self.activation_cap_bytes > 0,
                  "default_tile_px": self.default_tile_px > 0, "min_tile_latent": self.min_tile_latent >= 2,
                  "max_overlap_share": 0 <= self.max_overlap_share <= 0.25,
                  "ramp_fraction": 0 < self.ramp_fraction <= 1,
                  "cap_headroom": self.cap_headroom is None or self.cap_headroom >= 1}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TilingPolicy: invalid {', '.join(bad)} ({self})")


@dataclass(frozen=True)
class DecodeRequest:
    """What the node measured and what the user asked for; latent sizes in latent pixels."""
    batch: int
    latent_h: int
    latent_w: int
    upscale: int                  # output pixels per latent pixel along one axis (8 for SDXL/Flux)
    bytes_per_out_px: float       # working set of one image per output pixel, weights excluded
    weight_bytes: int             # weights not yet on the device (0 when already loaded)
    free_bytes: int               # free device memory measured just before the decode
    mode: str = "auto"
    tile_px: int = 0              # 0 = choose; else the tile side in output pixels
    overlap_px: int = 64
    # A limit from outside (VRAMGuard's request) on both tile sides in output px, 0 = none. auto and
    # always then tile whatever the free memory says; never ignores it (the caller says so).
    max_tile_px: int = 0

    def __post_init__(self):
        if self.mode not in TILING_MODES:
            raise ValueError(f"tiling {self.mode!r} is not one of {', '.join(TILING_MODES)}")
        if self.batch < 1:
            raise ValueError(f"the latent batch is empty ({self.batch} images): nothing to decode")
        for name in ("latent_h", "latent_w", "upscale"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecodeRequest.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.tile_px, self.overlap_px, self.max_tile_px) < 0:
            raise ValueError(f"tile size ({self.tile_px}), overlap ({self.overlap_px}) and max tile size "
                             f"({self.max_tile_px}) must be >= 0")


@dataclass(frozen=True)
class TilePlan:
    ys: tuple[tuple[int, int], ...]   # latent row spans [start, stop) of the tiles
    xs: tuple[tuple[int, int], ...]   # latent column spans
    batch_chunk: int                  # images decoded per call
    est_call_bytes: int               # estimated working set of one call (activations only)
    device: str = "gpu"               # "gpu" (the VAE's load device) or "cpu" (the fallback)
    reason: str = ""

    @property
    def tiled(self) -> bool:
        return len(self.ys) * len(self.xs) > 1

    @property
    def tile_hw(self) -> tuple[int, int]:
        return max(b - a for a, b in self.ys), max(b - a for a, b in self.xs)

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    def calls(self, batch: int) -> int:
        return self.n_tiles * math.ceil(batch / self.batch_chunk)

    def describe(self) -> str:
        th, tw = self.tile_hw
        what = f"{self.n_tiles} tiles of {th}x{tw} latent px" if self.tiled else f"whole {th}x{tw} latents"
        return f"{what}, {self.batch_chunk} image(s) per call on the {self.device}: {self.reason}"


def axis_spans(length: int, tile: int, overlap: int) -> tuple[tuple[int, int], ...]:
    """Evenly spread spans of equal size covering [0, length), neighbours overlapping by >= overlap.

    The tile is shrunk to the smallest size that needs no more tiles than `tile` would.

    >>> axis_spans(128, 72, 8)
    ((0, 68), (60, 128))
    >>> axis_spans(40, 64, 8)
    ((0, 40),)
    """
    if tile >= length:
        return ((0, length),)
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than the overlap ({overlap})")
    n = math.ceil((length - overlap) / (tile - overlap))
    t = math.ceil((length + (n - 1) * overlap) / n)
    while True:
        starts = [i * (length - t) // (n - 1) for i in range(n)]
        if all(t - (b - a) >= overlap for a, b in zip(starts, starts[1:])):
            return tuple((s, s + t) for s in starts)
        t += 1   # integer rounding of the starts left one overlap a pixel short


def axis_weights(spans: tuple[tuple[int, int], ...], upscale: int, ramp_fraction: float = 0.5) -> list[torch.Tensor]:
    """Blend weights in output pixels for each span (1-D, float32); over the axis they sum to 1.

    >>> w = axis_weights(((0, 6), (4, 10)), upscale=1, ramp_fraction=1.0)
    >>> [round(float(x), 3) for x in w[0]]
    [1.0, 1.0, 1.0, 1.0, 0.854, 0.146]
    """
    out = []
    for i, (a, b) in enumerate(spans):
        n = (b - a) * upscale
        w = torch.ones(n, dtype=torch.float64)
        if i > 0:                                   # rising over the overlap with the previous span
            zone = (spans[i - 1][1] - a) * upscale
            w[:zone] *= _ramp(zone, ramp_fraction)
        if i + 1 < len(spans):                      # falling over the overlap with the next span
            zone = (b - spans[i + 1][0]) * upscale
            w[n - zone:] *= 1 - _ramp(zone, ramp_fraction)
        out.append(w.float())
    return out


def _ramp(zone: int, fraction: float) -> torch.Tensor:
    """0 -> 1 over the central `fraction` of `zone` pixels, raised cosine (smooth at both ends)."""
    pos = (torch.arange(zone, dtype=torch.float64) + 0.5) / zone          # pixel centres in (0, 1)
    t = ((pos - (1 - fraction) / 2) / fraction).clamp(0, 1)
    return torch.sin(t * math.pi / 2) ** 2


def tile_side_for(budget_bytes: float, bytes_per_out_px: float, upscale: int) -> int:
    """Largest square tile side (latent px) whose working set fits `budget_bytes`.

    >>> tile_side_for(2 * GiB, 4356, 8)
    87
    """
    return int(math.sqrt(max(budget_bytes, 0) / bytes_per_out_px)) // upscale


def plan_decode(req: DecodeRequest, policy: TilingPolicy = TilingPolicy()) -> TilePlan:
    """Choose untiled or tiled, the tile size and images per call, from the estimate and free memory."""
    up, h, w = req.upscale, req.latent_h, req.latent_w
    usable = max(0.0, req.free_bytes * policy.safety - req.weight_bytes)
    budget = min(usable, policy.activation_cap_bytes)
    per_image = req.bytes_per_out_px * h * w * up * up
    limit = max(req.max_tile_px // up, policy.min_tile_latent) if req.max_tile_px else max(h, w)
    asked = f"tiles of at most {req.max_tile_px} px asked for by VRAMGuard"
    if req.mode == "never":
        return _plan(req, policy, h, w, usable, "tiling=never")
    if req.mode == "auto" and per_image <= budget and max(h, w) <= limit:
        return _plan(req, policy, h, w, budget,
                     f"whole decode ~{per_image / GiB:.2f} GiB fits {budget / GiB:.2f} GiB "
                     f"(free {req.free_bytes / GiB:.2f} GiB)")
    side = max(tile_side_for(budget, req.bytes_per_out_px, up), policy.min_tile_latent)
    if req.tile_px > 0:
        side = max(req.tile_px // up, policy.min_tile_latent)
        why = f"tile size {req.tile_px} px as set"
    elif req.mode == "always":
        side = min(side, max(policy.default_tile_px // up, policy.min_tile_latent))
        why = "tiling=always"
    elif per_image <= budget:       # it fits: only the limit tiles it
        why = asked
    else:
        why = (f"whole decode ~{per_image / GiB:.2f} GiB exceeds {budget / GiB:.2f} GiB "
               f"(free {req.free_bytes / GiB:.2f} GiB, cap {policy.activation_cap_bytes / GiB:.1f} GiB)")
    if req.max_tile_px and side > limit:
        side, why = limit, asked
    # A non-square image limits one side: give the other side the area it leaves (within the limit).
    th = min(side, h)
    tw = min(w, limit, max(side, (side * side) // th))
    th = min(h, limit, max(side, (side * side) // tw))
    return _plan(req, policy, th, tw, budget, why)


def _plan(req: DecodeRequest, policy: TilingPolicy, th: int, tw: int, budget: float, reason: str,
          device: str = "gpu") -> TilePlan:
    overlap = req.overlap_px // req.upscale
    overlap = min(overlap, int(min(th, tw) * policy.max_overlap_share)) if (th < req.latent_h or tw < req.latent_w) else 0
    ys = axis_spans(req.latent_h, th, overlap)
    xs = axis_spans(req.latent_w, tw, overlap)
    th, tw = ys[0][1] - ys[0][0], xs[0][1] - xs[0][0]
    per_call_image = req.bytes_per_out_px * th * tw * req.upscale ** 2
    chunk = int(min(req.batch, max(1, budget // max(per_call_image, 1))))
    return TilePlan(ys, xs, chunk, int(per_call_image * chunk), device, reason)


def shrink(plan: TilePlan, req: DecodeRequest, policy: TilingPolicy = TilingPolicy()) -> TilePlan | None:
    """The next plan after an out-of-memory error: one image per call, then half the tile side.

    Returns None when the tile is already at `policy.min_tile_latent` (then only the CPU is left).
    """
    if plan.batch_chunk > 1:
        return replace(plan, batch_chunk=1, est_call_bytes=plan.est_call_bytes // plan.batch_chunk,
                       reason="out of memory: one image per call")
    th, tw = plan.tile_hw
    if max(th, tw) <= policy.min_tile_latent:
        return None
    nh, nw = max(policy.min_tile_latent, th // 2), max(policy.min_tile_latent, tw // 2)
    new = _plan(replace(req, batch=1), policy, nh, nw, 0, "out of memory: half the tile side")
    return replace(new, device=plan.device)


def allocator_limit(reserved_bytes: int, plan: TilePlan, image_bytes: int,
                    policy: TilingPolicy = TilingPolicy()) -> int | None:
    """Bytes the device allocator may hold while `plan` decodes (None: leave it uncapped).

    >>> allocator_limit(1 << 30, TilePlan(((0, 8),), ((0, 8),), 1, 100 << 20), 12 << 20) >> 20
    1417
    """
    if policy.cap_headroom is None:
        return None
    return int(reserved_bytes + image_bytes + plan.est_call_bytes * policy.cap_headroom + policy.cap_slack_bytes)


def cpu_plan(plan: TilePlan, req: DecodeRequest) -> TilePlan:
    """The last resort: the same tiles on the CPU, one image per call (host RAM is not unlimited)."""
    return replace(plan, batch_chunk=1, device="cpu", reason="out of device memory at the smallest tile: CPU")


@dataclass
class Hooks:
    """What run_decode needs from the outside world (ComfyUI in the node, fakes in the tests)."""
    decode: Callable[[torch.Tensor, str], torch.Tensor]   # (latent chunk, "gpu"/"cpu") -> raw image chunk
    on_oom: Callable[[], None] = lambda: None              # free caches after an OOM
    to_cpu: Callable[[], None] = lambda: None              # move the decoder to the CPU for the fallback
    check_interrupt: Callable[[], None] = lambda: None     # raises when the user cancelled
    progress: Callable[[int, int], None] = lambda done, total: None
    warn: Callable[[str], None] = lambda msg: None
    # Where tiles are blended while the decoder runs on its device: the GPU itself (no per-tile copy or
    # sync; the fp32 image costs B*3*H*W*4 bytes, 12 MiB at 1024x1024). The CPU fallback blends on the CPU.
    work_device: torch.device | str = "cpu"
    oom_errors: tuple[type[BaseException], ...] = field(default=OOM_ERRORS)
    cpu_allowed: bool = True                               # False when the decoder already runs on the CPU


def run_decode(latent: torch.Tensor, plan: TilePlan, req: DecodeRequest, hooks: Hooks,
               policy: TilingPolicy = TilingPolicy()) -> tuple[torch.Tensor, TilePlan]:
    """Decode `latent` [B, C, h, w] by `plan`; on OOM retry smaller, then on the CPU (one warning each).

    Returns the raw blended output [B, C_out, h*up, w*up] (float32, on hooks.work_device, or on the
    CPU after the CPU fallback) and the plan that succeeded.
    """
    while True:
        try:
            return _decode_with(latent, plan, req, hooks, policy), plan
        except hooks.oom_errors as e:
            if plan.device == "cpu":
                raise
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        # Out of the except block: the traceback no longer pins the failed call's tensors.
        hooks.on_oom()
        nxt = shrink(plan, req, policy) if (plan.tiled or req.mode != "never") else None
        if nxt is None:
            if not hooks.cpu_allowed:
                raise MemoryError(f"VAE decode ran out of memory even with {plan.describe()} ({error}); "
                                  "free memory (unload models) or decode a smaller image")
            nxt = cpu_plan(plan, req)
            hooks.warn(f"VAE decode ran out of device memory with {plan.describe()} ({error}); "
                       f"decoding on the CPU instead (slow)")
            hooks.to_cpu()
        else:
            hooks.warn(f"VAE decode ran out of device memory with {plan.describe()} ({error}); "
                       f"retrying with {nxt.describe()}")
        plan = nxt


def _decode_with(latent: torch.Tensor, plan: TilePlan, req: DecodeRequest, hooks: Hooks,
                 policy: TilingPolicy) -> torch.Tensor:
    up, b = req.upscale, latent.shape[0]
    acc = torch.device(hooks.work_device if plan.device == "gpu" else "cpu")
    wy = [w.to(acc) for w in axis_weights(plan.ys, up, policy.ramp_fraction)]
    wx = [w.to(acc) for w in axis_weights(plan.xs, up, policy.ramp_fraction)]
    total, done = plan.calls(b), 0
    hooks.progress(0, total)
    out = None
    for i0 in range(0, b, plan.batch_chunk):
        i1 = min(b, i0 + plan.batch_chunk)
        for (y0, y1), wyi in zip(plan.ys, wy):
            for (x0, x1), wxi in zip(plan.xs, wx):
                hooks.check_interrupt()
                tile = hooks.decode(latent[i0:i1, :, y0:y1, x0:x1], plan.device)
                want = ((y1 - y0) * up, (x1 - x0) * up)
                if tuple(tile.shape[-2:]) != want:
                    raise RuntimeError(f"the VAE decoded a {y1 - y0}x{x1 - x0} latent tile to "
                                       f"{tuple(tile.shape[-2:])} pixels, expected {want} (upscale {up})")
                tile = tile.to(acc, torch.float32)
                if out is None:     # output channels are known only after the first call
                    out = torch.zeros((b, tile.shape[1], req.latent_h * up, req.latent_w * up), device=acc)
                if plan.tiled:
                    out[i0:i1, :, y0 * up:y1 * up, x0 * up:x1 * up] += tile * (wyi[:, None] * wxi[None, :])
                else:
                    out[i0:i1] = tile
                del tile
                done += 1
                hooks.progress(done, total)
    return out
