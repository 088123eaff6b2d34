"""OffloadConfig validation, and the docstring examples of every offload module."""

import doctest
import importlib

import pytest

from offload import GiB, MiB, OffloadConfig


def test_defaults_are_valid():
    cfg = OffloadConfig(budget_bytes=8 * GiB)
    assert (cfg.chunk_size, cfg.prefetch, cfg.pin_memory, cfg.margin_bytes) == (0, 0, True, 256 * MiB)


@pytest.mark.parametrize(
    "kwargs, error, field",
    [
        (dict(budget_bytes=0), ValueError, "budget_bytes"),
        (dict(budget_bytes=-5), ValueError, "budget_bytes"),
        (dict(budget_bytes=1.5e9), TypeError, "budget_bytes"),
        (dict(budget_bytes=True), TypeError, "budget_bytes"),
        (dict(budget_bytes=GiB, chunk_size=-1), ValueError, "chunk_size"),
        (dict(budget_bytes=GiB, chunk_size="2"), TypeError, "chunk_size"),
        (dict(budget_bytes=GiB, prefetch=-1), ValueError, "prefetch"),
        (dict(budget_bytes=GiB, prefetch=9), ValueError, "prefetch"),
        (dict(budget_bytes=GiB, margin_bytes=-1), ValueError, "margin_bytes"),
        (dict(budget_bytes=GiB, margin_bytes=GiB), ValueError, "margin_bytes"),
        (dict(budget_bytes=GiB, pin_memory="yes"), TypeError, "pin_memory"),
    ],
)
def test_invalid_values_name_the_field(kwargs, error, field):
    with pytest.raises(error, match=f"OffloadConfig.{field}"):
        OffloadConfig(**kwargs)


def test_config_is_frozen():
    cfg = OffloadConfig(budget_bytes=GiB)
    with pytest.raises(AttributeError):
        cfg.budget_bytes = 2 * GiB


@pytest.mark.parametrize(
    "module", ["config", "packing", "slots", "streams", "timeline", "planner", "streamer", "api"]
)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"offload.{module}"))
    assert result.failed == 0
    if module != "streams":
        assert result.attempted > 0, f"offload.{module} lost its example"
