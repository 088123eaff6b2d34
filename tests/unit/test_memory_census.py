"""nodes/_memory_census: each storage once, named by the module attribute that holds it."""
import doctest

import torch

from harness.pure_nodes import pure_node

census = pure_node("_memory_census")


def test_doctest():
    assert doctest.testmod(census).failed == 0


def test_views_count_once_and_owners_are_named():
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.big = torch.nn.Parameter(torch.zeros(1000, 777))  # 3,108,000 bytes: a shape nothing else has
            self.register_buffer("table", torch.zeros(333, 777))

    h = Holder()
    views = [h.big[:10], h.big.t()]  # views of a counted storage add nothing
    loose = [torch.ones(555, 777)]  # owned by no module: named by its referrer (this list)
    c = census.tensor_census("cpu", top=10_000)
    rows = {(g["owner"], tuple(g["shape"])): g for g in c["top"]}
    assert rows[("Holder.big", (1000, 777))]["bytes"] == 1000 * 777 * 4
    assert rows[("Holder.table", (333, 777))]["bytes"] == 333 * 777 * 4
    assert rows[("list", (555, 777))]["count"] == 1
    assert not any(tuple(g["shape"]) in ((10, 777), (777, 1000)) for g in c["top"])
    assert views and loose


def test_allocator_bytes_is_empty_off_cuda():
    assert census.allocator_bytes("cpu") == {}
