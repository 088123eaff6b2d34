"""bench.dequant_sweep's parts that run anywhere: the tile grid and the bytes a Flux step's dequant moves."""
import pytest

from bench.dequant_sweep import DEFAULT_TILES, parse_tiles, step_bytes
from bench.fp8_linear_micro import FLUX_SHAPES


def test_the_tile_grid_is_every_combination_in_order():
    assert parse_tiles("rows=1,4;block_k=1024;warps=4,8") == [(1, 1024, 4), (1, 1024, 8), (4, 1024, 4), (4, 1024, 8)]
    assert len(parse_tiles(DEFAULT_TILES)) == 4 * 4 * 2


def test_a_tile_grid_without_a_field_names_it():
    with pytest.raises(ValueError, match="warps"):
        parse_tiles("rows=1;block_k=1024")


def test_a_flux_step_dequantizes_its_304_weights_at_three_bytes_each():
    assert sum(count for *_, count in FLUX_SHAPES) == 304
    # 11.9e9 quantized weights (Flux-dev without its 10 high-precision layers): 1 byte read + 2 written
    assert 35.5e9 < step_bytes() < 36.0e9
