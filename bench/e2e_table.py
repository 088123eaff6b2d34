"""The README tables of bench.workflows_e2e: merge result files (later files win per row) and print markdown.

    python -m bench.e2e_table bench/results/workflows_e2e_nvidia-h200_*.json

Table 1 (issue #8): each workflow at its tier, ours and the core rewrite: first prompt after server start,
repeat prompt (next seed), sampler s/it, peak above the empty GPU. Table 2 (issue #6): our graph at
budgets below the tier with VRAMGuard adapt: finished?, peak, s/it, what the guard decided.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def merged_rows(files: list[str]) -> dict[tuple, dict]:
    rows: dict[tuple, dict] = {}
    for f in sorted(files):
        for r in json.loads(Path(f).read_text())["rows"]:
            if r.get("kind") == "prompt":
                # Rows measured after a warm-up (--warm-start) never stand in for cold-start rows: part "tier+warm".
                part = r["part"] + ("+warm" if r.get("kernel_cache") == "warm" else "")
                rows[(r["workflow"], r["graph"], part, r["prompt"], r["budget_gib"])] = r | {"file": Path(f).name}
    return rows


def truncated(v: float, digits: int) -> str:
    """`v` to `digits` decimals, cut, never rounded up.
    >>> truncated(16.28, 1), truncated(0.1669, 3)
    ('16.2', '0.166')
    """
    scale = 10 ** digits
    return f"{math.floor(v * scale + 1e-9) / scale:.{digits}f}"


def _fmt(r: dict | None, key: str, digits: int = 2) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "failed"
    v = r.get(key)
    return "-" if v is None else truncated(v, digits)


def tier_table(rows: dict) -> str:
    out = ["| workflow | budget GiB | ours first s | ours repeat s | ours s/it | ours peak GiB | core first s | "
           "core repeat s | core s/it | core peak GiB |", "|" + "---|" * 10]
    for key in sorted({k[0] for k in rows if k[2] == "tier"}):
        tier = next(k[4] for k in rows if k[0] == key and k[2] == "tier")
        o1, o2 = rows.get((key, "ours", "tier", "first", tier)), rows.get((key, "ours", "tier", "repeat", tier))
        c1, c2 = rows.get((key, "core", "core", "first", tier)), rows.get((key, "core", "core", "repeat", tier))
        out.append(f"| `{key}` | {tier:g} | {_fmt(o1, 'prompt_s')} | {_fmt(o2, 'prompt_s')} | {_fmt(o1, 's_per_it', 3)} "
                   f"| {_fmt(o1, 'peak_gib')} | {_fmt(c1, 'prompt_s')} | {_fmt(c2, 'prompt_s')} | "
                   f"{_fmt(c1, 's_per_it', 3)} | {_fmt(c1, 'peak_gib')} |")
    return "\n".join(out)


def extra_table(rows: dict) -> str:
    out = ["| reference | budget GiB | first s | repeat s | s/it | peak GiB |", "|" + "---|" * 6]
    for k, r in sorted(rows.items(), key=lambda kv: kv[0][0]):
        if k[2] == "extra" and k[3] == "first":
            again = rows.get((k[0], k[1], "extra", "repeat", k[4]))
            budget = "unlimited" if k[4] is None else f"{k[4]:g}"
            out.append(f"| {r.get('label') or k[0]} (`{k[0]}`, {k[1]}) | {budget} | {_fmt(r, 'prompt_s')} | "
                       f"{_fmt(again, 'prompt_s')} | {_fmt(r, 's_per_it', 3)} | {_fmt(r, 'peak_gib')} |")
    return "\n".join(out)


def ladder_table(rows: dict) -> str:
    out = ["| workflow | budget GiB | finished | peak GiB | s/it | VRAMGuard |", "|" + "---|" * 6]
    for k, r in sorted(((k, r) for k, r in rows.items() if k[2] == "ladder"), key=lambda kv: (kv[0][0], -kv[0][4])):
        verdict = (r.get("vramguard_report") or {}).get("decision", {}).get("verdict", "-")
        done = "no: " + r["error"][:60] if "error" in r else ("yes" if r.get("within_budget") else "over budget")
        out.append(f"| `{k[0]}` | {k[4]:g} | {done} | {_fmt(r, 'peak_gib')} | {_fmt(r, 's_per_it', 3)} | {verdict} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    files = argv if argv is not None else sys.argv[1:]
    rows = merged_rows(files)
    print(tier_table(rows), "", extra_table(rows), "", ladder_table(rows), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
