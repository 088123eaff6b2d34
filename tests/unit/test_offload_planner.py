"""Planner: resident prefix, chunking, prefetch depth, refusal below the floor, predicted time."""

import pytest

from offload import BudgetTooSmall, MiB, Plan, plan
from offload.timeline import simulate_pass

BLOCKS = [100 * MiB] * 10


def test_everything_fits_means_nothing_streamed():
    p = plan(BLOCKS, budget_bytes=2000 * MiB, activation_bytes=500 * MiB, seconds_per_block=[0.01] * 10)
    assert p.resident_blocks == tuple(range(10)) and p.streamed_groups == ()
    assert p.slot_count == 0 and p.streamed_bytes == 0
    assert p.predicted_s == pytest.approx(0.1) and "streamed: nothing" in p.describe()


def test_resident_prefix_grows_with_budget():
    previous = -1
    for budget in range(200, 1600, 50):
        p = plan(BLOCKS, budget_bytes=budget * MiB, activation_bytes=0)
        n = len(p.resident_blocks)
        assert p.resident_blocks == tuple(range(n)), "resident blocks must be a prefix"
        assert n >= previous
        assert p.device_bytes <= p.budget_bytes
        previous = n
    assert previous == 10


@pytest.mark.parametrize("seconds", [None, [0.002] * 10, [0.0005, 0.004] * 5])
def test_predicted_time_never_grows_with_budget(seconds):
    times = [
        plan(BLOCKS, budget_bytes=b * MiB, activation_bytes=50 * MiB, seconds_per_block=seconds).predicted_s
        for b in range(250, 1300, 25)
    ]
    assert all(later <= earlier for earlier, later in zip(times, times[1:]))
    assert times[0] > times[-1]


def test_refuses_below_floor_with_the_exact_smallest_budget():
    # floor with nothing resident: 2 slots x 100 MiB + 30 MiB activations + 10 MiB margin
    smallest = 2 * 100 * MiB + 30 * MiB + 10 * MiB
    ok = plan(BLOCKS, budget_bytes=smallest, activation_bytes=30 * MiB, margin_bytes=10 * MiB)
    assert ok.device_bytes == smallest and ok.resident_blocks == ()
    with pytest.raises(BudgetTooSmall, match=f"at least {smallest}") as info:
        plan(BLOCKS, budget_bytes=smallest - 1, activation_bytes=30 * MiB, margin_bytes=10 * MiB)
    assert info.value.smallest_budget_bytes == smallest
    assert "2 transfer slots" in str(info.value)


def test_floor_can_come_from_a_resident_prefix():
    # one big block first: keeping it resident beats two slots of its size
    blocks = [100 * MiB, 10 * MiB, 10 * MiB, 10 * MiB]
    smallest = 100 * MiB + 2 * 10 * MiB
    assert plan(blocks, budget_bytes=smallest, activation_bytes=0).resident_blocks == (0,)
    with pytest.raises(BudgetTooSmall, match=f"{smallest} bytes .* = 1 resident block.*at least {smallest}"):
        plan(blocks, budget_bytes=smallest - 1, activation_bytes=0)


def test_forced_chunk_and_prefetch_are_used():
    p = plan(BLOCKS, budget_bytes=900 * MiB, activation_bytes=0, chunk_size=3, prefetch=2)
    assert (p.chunk_size, p.prefetch, p.slot_count) == (3, 2, 3)
    assert all(len(p.groups[g]) <= 3 for g in p.streamed_groups)
    assert p.device_bytes <= 900 * MiB


@pytest.mark.parametrize("chunk, depth", [(0, 0), (3, 2), (2, 1), (1, 3)])
def test_smallest_budget_in_the_message_is_exact(chunk, depth):
    blocks = [70 * MiB, 130 * MiB, 90 * MiB, 100 * MiB, 60 * MiB, 120 * MiB, 80 * MiB]
    args = dict(activation_bytes=25 * MiB, margin_bytes=5 * MiB, chunk_size=chunk, prefetch=depth)
    with pytest.raises(BudgetTooSmall) as info:
        plan(blocks, budget_bytes=MiB, **args)
    smallest = info.value.smallest_budget_bytes
    assert f"at least {smallest}" in str(info.value)
    assert plan(blocks, budget_bytes=smallest, **args).device_bytes == smallest
    with pytest.raises(BudgetTooSmall, match=f"at least {smallest}"):
        plan(blocks, budget_bytes=smallest - 1, **args)


def test_spread_layout_when_a_resident_stretch_would_idle_the_copy_engine():
    # transfer 5.4 ms vs compute 2 ms per block: a resident prefix of 24 blocks computes for 48 ms while
    # the copy engine can only fill 2 slots; resident blocks spread out keep it busy: floor reached
    p = plan([300 * MiB] * 57, budget_bytes=7800 * MiB, activation_bytes=0, seconds_per_block=[0.002] * 57)
    assert p.layout == "spread" and len(p.resident_blocks) == 24
    assert p.predicted_s == pytest.approx(p.floor_s, rel=0.01)
    assert "spread through the order" in p.describe()


def test_tiny_blocks_are_grouped_to_amortise_copy_overhead():
    # 64 KiB blocks copy in ~1 us; the fixed ~20 us per copy makes larger groups faster
    p = plan([64 * 1024] * 32, budget_bytes=1 * MiB, activation_bytes=0)
    assert p.chunk_size > 1


def test_compute_bound_plan_predicts_compute_time():
    # 10 ms compute per block, 100 MiB copies in ~1.9 ms: transfer hides behind compute
    p = plan(BLOCKS, budget_bytes=400 * MiB, activation_bytes=0, seconds_per_block=[0.01] * 10)
    assert p.streamed_groups and p.compute_s == pytest.approx(0.1)
    assert p.predicted_s == pytest.approx(p.floor_s, rel=1e-3)
    assert "compute-bound" in p.describe()


def test_transfer_bound_plan_predicts_transfer_time():
    p = plan(BLOCKS, budget_bytes=400 * MiB, activation_bytes=0, seconds_per_block=[1e-4] * 10)
    assert p.floor_s == pytest.approx(p.transfer_s)
    assert p.transfer_s == pytest.approx(p.streamed_bytes / 55.6e9)
    assert p.predicted_s >= p.floor_s and "transfer-bound" in p.describe()


def test_simulation_known_values():
    gb = 10**9
    # transfer-bound: two 1 GB copies at 10 GB/s per pass
    assert simulate_pass([gb, gb], [0.05, 0.05], [False, False], 1, 1e10, 0.0) == pytest.approx(0.2)
    # compute-bound: 0.5 s compute per group hides 0.1 s copies
    assert simulate_pass([gb, gb], [0.5, 0.5], [False, False], 1, 1e10, 0.0) == pytest.approx(1.0)
    # a resident group computes while the next pass's first group copies
    assert simulate_pass([gb, gb], [0.3, 0.0], [True, False], 1, 1e10, 0.0) == pytest.approx(0.3)


def test_deeper_prefetch_helps_when_compute_varies():
    # groups alternate cheap and expensive compute; a third slot lets copies run ahead
    gb = 10**9
    args = ([gb] * 6, [0.0, 0.2] * 3, [False] * 6)
    one, two = simulate_pass(*args, 1, 1e10, 0.0), simulate_pass(*args, 2, 1e10, 0.0)
    assert two < one
    chosen = plan([gb] * 6, budget_bytes=3 * gb, activation_bytes=0, seconds_per_block=[0.0, 0.2] * 3,
                  h2d_bytes_per_s=1e10)
    assert chosen.prefetch >= 2 or chosen.resident_blocks


def test_describe_explains_the_plan():
    text = plan(BLOCKS, budget_bytes=600 * MiB, activation_bytes=0, seconds_per_block=[0.01] * 10).describe()
    for fact in ("resident: blocks 0-3", "prefix", "streamed: blocks 4-9", "prefetch: 1", "floor", "predicted"):
        assert fact in text, fact


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_bytes=[]), "block_bytes is empty"),
        (dict(block_bytes=[-1]), "block_bytes"),
        (dict(budget_bytes=-1), "budget_bytes"),
        (dict(activation_bytes=1.5), "activation_bytes"),
        (dict(seconds_per_block=[0.1]), "seconds_per_block needs 10"),
        (dict(h2d_bytes_per_s=0), "h2d_bytes_per_s"),
        (dict(prefetch=99), "prefetch"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    args = dict(block_bytes=BLOCKS, budget_bytes=500 * MiB, activation_bytes=0) | kwargs
    with pytest.raises(ValueError, match=match):
        plan(**args)


def test_plan_rejects_groups_that_do_not_split_the_blocks():
    common = dict(block_bytes=(1, 1, 1), budget_bytes=10, activation_bytes=0, margin_bytes=0,
                  h2d_bytes_per_s=1.0, compute_s=None, predicted_s=0.0, chunk_size=1)
    with pytest.raises(ValueError, match="Plan.groups"):
        Plan(groups=((0,), (2,), (1,)), resident=(False,) * 3, prefetch=1, **common)
    with pytest.raises(ValueError, match="Plan.prefetch"):
        Plan(groups=((0,), (1,), (2,)), resident=(False,) * 3, prefetch=0, **common)
