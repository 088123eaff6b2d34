"""Plain-text tables for the end of a benchmark log (the device tool returns only the output's tail)."""
from __future__ import annotations

from typing import Any, Sequence


def fmt(value: Any, digits: int = 3) -> str:
    """None -> '-', floats to `digits` decimals, the rest via str()."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """Markdown-compatible table, columns padded to their widest cell.

    >>> print(format_table(["a", "b"], [[1, 0.5], [None, True]]))
    | a | b     |
    |---|-------|
    | 1 | 0.500 |
    | - | yes   |
    """
    cells = [[fmt(v, digits) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(parts):
        return "| " + " | ".join(p.ljust(w) for p, w in zip(parts, widths)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)
