"""Does torch.compile (ComfyUI's TorchCompileModel: inductor on the whole diffusion model) compute the same
function as eager ComfyUI? One Flux-dev forward, eager vs compiled, and each kind of block alone.

    COMFYUI_PATH=... python -m bench.compile_fidelity --model /tmp/models/diffusion_models/flux1-dev.safetensors \
        --out $OUT/compile_fidelity.json [--size 1024] [--txt-tokens 256]

Why: in bench.fp8_flux (2026-11-21T1432) both compiled rows, ComfyUI bf16 and ours fp8, ended 5 steps
0.38-0.39 (relative L2) away from eager bf16, while eager fp8 was 0.039 away: ten times the error of fp8
quantization cannot be inductor's rounding, so either the compiled function differs or this random model
amplifies tiny differences. Rows here: rel. L2 of one forward (eager again: 0 if deterministic; compiled);
per block kind, the same block on the same captured inputs, eager vs compiled; and, as the yardstick of
rounding, eager bf16 vs the same forward with every Linear computed in fp32.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from .comfy_core_flux import import_comfy
from .fp8_flux import rel_l2
from .results import device_environment, host_environment, utc_now, write_json


def inputs(dm, size: int, txt_tokens: int, device, dtype, seed: int = 0):
    """Random latent [1, C, size/8, size/8], T5 context [1, T, D_ctx], pooled CLIP [1, D_y]: sizes from the model."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, dm.img_in.in_features // 4, size // 8, size // 8, generator=g)   # 2x2 patches
    context = torch.randn(1, txt_tokens, dm.txt_in.in_features, generator=g)
    y = torch.randn(1, dm.vector_in.in_layer.in_features, generator=g)
    return (x.to(device, dtype), torch.tensor([0.7], device=device, dtype=dtype), context.to(device, dtype),
            y.to(device, dtype), torch.tensor([3.5], device=device, dtype=dtype))


def capture_block_inputs(dm, names: list[str]) -> tuple[dict, list]:
    """Forward pre-hooks that keep a copy of the first call's args/kwargs of each named block."""
    captured, hooks = {}, []
    for name in names:
        block = dm.get_submodule(name)

        def keep(module, args, kwargs, name=name):
            if name not in captured:
                clone = lambda v: v.detach().clone() if torch.is_tensor(v) else v
                captured[name] = ([clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()})
        hooks.append(block.register_forward_pre_hook(keep, with_kwargs=True))
    return captured, hooks


def first_tensor(out):
    return out if torch.is_tensor(out) else next(t for t in out if torch.is_tensor(t))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compile_fidelity", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--txt-tokens", type=int, default=256)
    ap.add_argument("--cpu", action="store_true", help="ComfyUI on the CPU (a check of this script, tiny model)")
    a = ap.parse_args(argv)
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        raise SystemExit("COMFYUI_PATH is not set: point it at a ComfyUI tree (the folder with main.py)")
    _args, mm, _sample, folder_paths, nodes = import_comfy(comfyui_path, ["--cpu"] if a.cpu else [])
    model_path = Path(a.model).resolve()
    folder_paths.add_model_folder_path("diffusion_models", str(model_path.parent), is_default=True)
    (patcher,) = nodes.UNETLoader().load_unet(model_path.name, "default")
    mm.load_models_gpu([patcher])
    dm = patcher.model.diffusion_model
    device, dtype = mm.get_torch_device(), patcher.model.get_dtype()
    x, t, ctx, y, guidance = inputs(dm, a.size, a.txt_tokens, device, dtype)
    call = lambda f: f(x, t, ctx, y=y, guidance=guidance)
    blocks = ["double_blocks.0", "single_blocks.0"]
    result = {"benchmark": "compile_fidelity", "started": utc_now(),
              "environment": {**host_environment(comfyui_path), **device_environment(device)},
              "model": str(model_path), "size": a.size, "txt_tokens": a.txt_tokens, "dtype": str(dtype), "rows": []}
    rows = result["rows"]

    def row(what: str, value: float, **extra) -> None:
        rows.append({"what": what, "rel_l2": value, **extra})
        print(f"[fidelity] {what}: rel L2 {value:.3e} {extra or ''}", flush=True)

    with torch.no_grad():
        captured, hooks = capture_block_inputs(dm, blocks)
        eager = call(dm)
        for h in hooks:
            h.remove()
        row("full forward: eager again", rel_l2(call(dm), eager))
        # Rounding yardstick: the same forward with each Linear in fp32 (weights upcast per call).
        linears = [m for m in dm.modules() if isinstance(m, torch.nn.Linear)]
        saved = [m.forward for m in linears]
        for m in linears:
            m.forward = (lambda inp, m=m: torch.nn.functional.linear(
                inp.float(), m.weight.float(), None if m.bias is None else m.bias.float()).to(inp.dtype))
        row("full forward: Linears in fp32 (rounding yardstick)", rel_l2(call(dm), eager))
        for m, f in zip(linears, saved):
            m.forward = f
        for name in blocks:
            block = dm.get_submodule(name)
            args, kwargs = captured[name]
            ref = first_tensor(block(*args, **kwargs))
            t0 = time.perf_counter()
            got = first_tensor(torch.compile(block)(*args, **kwargs))
            row(f"{name} alone: compiled vs eager", rel_l2(got, ref), compile_s=round(time.perf_counter() - t0, 1))
        t0 = time.perf_counter()
        compiled = torch.compile(dm)
        out = call(compiled)
        row("full forward: compiled vs eager", rel_l2(out, eager), compile_s=round(time.perf_counter() - t0, 1))
        row("full forward: compiled again vs compiled", rel_l2(call(compiled), out))
    result["finished"] = utc_now()
    write_json(Path(a.out), result)
    print(f"[fidelity] wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
