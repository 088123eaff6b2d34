"""bench.eager_launch_bound runs one Flux step's quantized linears: as many as Float8DiTLoader quantizes in
Flux-dev (its GPU log: "304 layers quantized"), with the shapes of the synthetic Flux-dev file."""
import torch

from bench.eager_launch_bound import HIDDEN, step_shapes
from harness.synthetic.flux import FluxConfig, flux_specs


def test_one_step_has_the_304_quantized_linears_of_flux_dev_with_their_shapes():
    shapes = step_shapes()
    assert len(shapes) == 304
    specs = flux_specs(FluxConfig(), torch.bfloat16)
    weights = {tuple(spec.shape) for spec in specs
               if "_blocks." in spec.key and spec.key.endswith(".weight") and len(spec.shape) == 2}
    assert {(o, i) for i, o, _ in shapes} <= weights
    assert all(t in (1, 512, 4096, 4608) for _, _, t in shapes) and shapes[0] == (HIDDEN, 6 * HIDDEN, 1)


def test_one_newbie_call_has_the_linears_of_the_synthetic_newbie_dit():
    from bench.eager_launch_bound import newbie_call_shapes
    from harness.synthetic.nextdit import NEWBIE_FULL, nextdit_specs

    shapes = newbie_call_shapes(1, 200)
    weights = {tuple(spec.shape) for spec in nextdit_specs(NEWBIE_FULL)
               if "layers." in spec.key and spec.key.endswith(".weight") and len(spec.shape) == 2}
    assert {(o, i) for i, o, _ in shapes} <= weights
    assert len(shapes) == 38 * 6 + 2 * 5
    assert {t for *_, t in shapes} == {1, 200, 4096, 4296}
    assert {t for *_, t in newbie_call_shapes(2, 200)} == {1, 400, 8192, 8592}
