"""bench.e2e_table: figures are cut to their digits, never rounded up."""
import doctest

from bench import e2e_table


def test_doctest():
    assert doctest.testmod(e2e_table).failed == 0


def test_a_row_is_printed_truncated():
    assert e2e_table._fmt({"prompt_s": 20.859}, "prompt_s") == "20.85"
    assert e2e_table._fmt({"s_per_it": 0.1999}, "s_per_it", 3) == "0.199"
    assert e2e_table._fmt({"error": "x"}, "prompt_s") == "failed" and e2e_table._fmt(None, "prompt_s") == "-"
