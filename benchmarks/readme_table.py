"""README's results table, generated from result files of `benchmarks.run` (tests/test_docs.py checks the README's
table against this output for the files its marker names).

    python -m benchmarks.readme_table RESULT.json [RESULT.json ...]

Each batch size's column comes from the first file holding that batch size (its median-over-rounds rows when it has
several rounds), MT-Bench at T=0; the rows are the headline configurations below.
"""
from __future__ import annotations

import json
import sys

ROWS = [("vLLM native EAGLE K=2, same head", "native-eagle-k2"),
        ("**ours, chain K=2 (default)**", "ours-chain-k2"),
        ("ours, 3-node tree `[(0,), (1,), (0, 0)]`", "ours-tree-n3-d2"),
        ("ours, dynamic tree (4, 4, 8)", "ours-dynamic-n8-d4-k4"),
        ("ours, chain K=2, gate off", "ours-chain-k2-fixed")]


def columns(paths: list[str]) -> dict[int, dict[str, dict]]:
    """-> {batch size: {config: row}} over the files, the first file holding a batch size winning."""
    out: dict[int, dict[str, dict]] = {}
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        rows = result["combined_rows"] or result["rows"]
        for bs in sorted({r["batch_size"] for r in rows}):
            if bs not in out:
                out[bs] = {r["config"]: r for r in rows if r["batch_size"] == bs and r["workload"] == "mtbench"
                           and r["temperature"] == 0}
    return out


def cell(row: dict | None, bold: bool = False) -> str:
    if row is None:
        return "–"
    speed = f"{row['speedup']:.2f}×"
    notes = [f"τ {row['tau']:.2f}"] + ([f"{100 * row['gated_share']:.0f} % gated"] if row.get("gated_share") else [])
    return f"{'**' + speed + '**' if bold else speed} ({', '.join(notes)})"


def table(paths: list[str]) -> str:
    cols = columns(paths)
    sizes = sorted(cols)
    lines = [f"| config (T=0) | {' | '.join(f'batch {bs}' for bs in sizes)} |", "|---" * (len(sizes) + 1) + "|",
             f"| vanilla vLLM tok/s | {' | '.join(format(cols[bs]['vanilla']['tokens_per_s'], '.1f') for bs in sizes)} |"]
    for label, config in ROWS:
        lines.append(f"| {label} | {' | '.join(cell(cols[bs].get(config), label.startswith('**')) for bs in sizes)} |")
        if config == "ours-chain-k2":
            ratio = [cols[bs][config]["tokens_per_s"] / cols[bs]["native-eagle-k2"]["tokens_per_s"] for bs in sizes]
            lines.append(f"| ours vs native EAGLE | {' | '.join(f'{x:.2f}×' for x in ratio)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(sys.argv[1:]), end="")
