"""offload.floor: the smallest budget plan() accepts, computed without timing, for a check before sampling."""

import random

import pytest

from offload import BudgetTooSmall, MiB, floor, plan


def test_floor_is_two_slots_of_the_largest_block_plus_activations_and_margin():
    f = floor([100 * MiB] * 10, activation_bytes=30 * MiB, margin_bytes=10 * MiB)
    assert f.budget_bytes == 2 * 100 * MiB + 30 * MiB + 10 * MiB
    assert (f.resident_count, f.slot_count, f.slot_bytes, f.chunk_size) == (0, 2, 100 * MiB, 1)
    assert f.describe().startswith(f"{f.budget_bytes} bytes (240.00 MiB) = 2 transfer slots x 100.00 MiB")


def test_floor_can_keep_a_big_block_resident():
    # one big block first: keeping it resident beats two slots of its size
    f = floor([100 * MiB, 10 * MiB, 10 * MiB, 10 * MiB], activation_bytes=0)
    assert f.budget_bytes == 100 * MiB + 2 * 10 * MiB and f.resident_count == 1
    assert "1 resident block(s) 100.00 MiB + 2 transfer slots x 10.00 MiB" in f.describe()


def test_forced_chunk_and_prefetch_can_make_all_resident_the_floor():
    blocks = [10 * MiB] * 4
    f = floor(blocks, activation_bytes=0, chunk_size=4, prefetch=3)  # 4 slots of 40 MiB > the 40 MiB of blocks
    assert f.budget_bytes == 40 * MiB and f.resident_count == 4 and "transfer slots" not in f.describe()
    assert plan(blocks, budget_bytes=f.budget_bytes, activation_bytes=0, chunk_size=4, prefetch=3).streamed_groups == ()


def test_floor_grows_byte_for_byte_with_activations():
    blocks = [70 * MiB, 130 * MiB, 90 * MiB, 100 * MiB]
    base = floor(blocks, activation_bytes=0, margin_bytes=5 * MiB).budget_bytes
    for act in (1, 17 * MiB, 3000 * MiB):
        assert floor(blocks, activation_bytes=act, margin_bytes=5 * MiB).budget_bytes == base + act


@pytest.mark.parametrize("seed", range(12))
def test_floor_is_exactly_where_plan_starts_to_refuse(seed):
    rng = random.Random(seed)
    blocks = [rng.randint(1, 200) * MiB for _ in range(rng.randint(1, 12))]
    args = dict(activation_bytes=rng.randint(0, 300) * MiB, margin_bytes=rng.randint(0, 50) * MiB,
                chunk_size=rng.choice([0, 0, 1, 2, 3]), prefetch=rng.choice([0, 0, 1, 2]))
    f = floor(blocks, **args)
    assert plan(blocks, budget_bytes=f.budget_bytes, **args).device_bytes <= f.budget_bytes
    with pytest.raises(BudgetTooSmall) as info:
        plan(blocks, budget_bytes=f.budget_bytes - 1, **args)
    # plan's message is built from the same Floor: same number, same breakdown
    assert info.value.smallest_budget_bytes == f.budget_bytes
    assert f.describe() in str(info.value)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="block_bytes is empty"):
        floor([], activation_bytes=0)
    with pytest.raises(ValueError, match="activation_bytes"):
        floor([MiB], activation_bytes=-1)
