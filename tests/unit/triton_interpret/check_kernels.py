"""Run under TRITON_INTERPRET=1 (CPU): the Triton kernels of quant/ against their PyTorch references.

Started by tests/unit/test_triton_kernels.py in a subprocess, because Triton reads TRITON_INTERPRET when
a kernel is defined, i.e. at import. Prints one JSON line of findings; exits 1 on any mismatch.
The interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest), so bf16 results are
compared within one bf16 ulp here and exactly in fp32; the GPU benchmarks check them bit for bit.
"""
import itertools
import json
import sys

import torch

from quant.act_quant_triton import launch_per_token
from quant.dequant_triton import DEFAULT_TILE, DequantTile, launch_dequant
from quant.matmul import quantize_activation
from quant.swiglu import silu_mul_eager
from quant.swiglu_triton import launch_silu_mul_


def every_fp8_value(dtype: torch.dtype) -> torch.Tensor:
    # all 256 byte patterns except the NaN/inf codes: [V]
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    finite = codes.float().isfinite()
    return codes[finite]


# The shipped tile, one row per program, and tiles with more rows than a tensor has and narrower than its rows.
TILES = (DEFAULT_TILE, DequantTile(1, 1024, 4), DequantTile(8, 64, 4))


def check_dequant(findings: dict) -> bool:
    ok = True
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        values = every_fp8_value(dtype)                              # [V] every finite code
        # [96, 80]: many rows, a part of one column block; [3, 2500]: rows of two and a part column blocks
        for shape in ((96, 80), (3, 2500)):
            w = values[torch.randint(0, values.numel(), shape, generator=g)]
            w[0, : min(values.numel(), shape[1])] = values[: shape[1]]
            for scale, tile in itertools.product((torch.rand(shape[0], generator=g) + 0.01, torch.tensor(0.37)),
                                                 TILES):
                ref32 = w.float() * (scale.reshape(-1, 1) if scale.ndim else scale)
                got32 = launch_dequant(w, scale, torch.float32, tile)
                exact = torch.equal(got32, ref32)
                got16 = launch_dequant(w, scale, torch.bfloat16, tile).float()
                ulp = (ref32.abs().clamp(min=2.0 ** -126).log2().floor() - 7).exp2()
                within = bool(((got16 - ref32).abs() <= ulp).all())
                findings[f"dequant {dtype} {list(shape)} scale{list(scale.shape)} {tile}"] = {
                    "fp32_exact": exact, "bf16_within_ulp": within}
                ok &= exact and within
    return ok


def check_act_quant(findings: dict) -> bool:
    g = torch.Generator().manual_seed(1)
    ok = True
    # K below one tile, and K over two tiles with a masked tail read through a row stride wider than K
    # (a column slice): the kernel is compiled once for every K and stride, so both must come out right.
    for k, stride in ((200, 200), (2100, 2304)):
        x = (torch.randn(33, stride, generator=g) * 3)[:, :k]
        x[5] = 0.0                                                   # an all-zero token
        ref_a, ref_s = quantize_activation(x, "per_token")
        a, s = launch_per_token(x)
        same_scale = torch.allclose(s, ref_s, rtol=1e-6, atol=0)
        # The interpreter's fp32 -> fp8 cast does not round as the GPU does (it truncates, and mishandles a
        # value that rounds up into the next binade), so only most codes can be compared here; the GPU
        # benchmark (bench/fp8_linear_micro.py) compares them all.
        equal = float((a.float() == ref_a.float()).float().mean())
        findings[f"act_quant per_token K={k} stride={stride}"] = {"scale_close": same_scale,
                                                                  "codes_mostly_equal": equal >= 0.95}
        ok &= same_scale and equal >= 0.95
    return ok


def check_silu_mul(findings: dict) -> bool:
    g = torch.Generator().manual_seed(2)
    ok = True
    # H below one tile, and H over two tiles; up read through a row stride wider than H (a column slice).
    for h, stride in ((200, 200), (2100, 2304)):
        gate = (torch.randn(21, h, generator=g) * 4).to(torch.bfloat16)
        up = torch.randn(21, stride, generator=g).to(torch.bfloat16)[:, :h]
        gate[3] = 0.0                                               # an all-zero token
        ref_a, ref_s = silu_mul_eager(gate, up)
        scratch = gate.clone()
        a, s = launch_silu_mul_(scratch, up)            # writes the product over its first operand
        product = (torch.nn.functional.silu(gate) * up).float()
        overwritten = bool(((scratch.float() - product).abs() <= product.abs() * 2 ** -6 + 1e-30).all())
        # The interpreter truncates each of the two bf16 roundings (silu, product; see above), so the amax may
        # come out up to two bf16 steps lower, and with it every code; and its fp8 cast mishandles values that
        # round into the next binade (as above). So values, mostly, here; bit for bit on the GPU
        # (tests/unit/test_quant_swiglu.py, gpu-marked).
        scale_close = torch.allclose(s, ref_s, rtol=2 ** -6, atol=0)
        got, want = a.float() * s, ref_a.float() * ref_s
        values_close = float(((got - want).abs() <= want.abs() * 2 ** -3 + ref_s * 2 ** -8).float().mean()) >= 0.95
        findings[f"silu_mul per_token H={h} stride={stride}"] = {
            "scale_close": scale_close, "values_close": values_close, "gate_holds_the_product": overwritten}
        ok &= scale_close and values_close and overwritten
    return ok


def main() -> int:
    findings: dict = {}
    ok = check_dequant(findings)
    ok &= check_act_quant(findings)
    ok &= check_silu_mul(findings)
    print(json.dumps(findings, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
