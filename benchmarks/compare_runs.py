"""Before/after table from interleaved benchmark runs: each entry's ratio to the best torch.optim eager
entry of its group (torch fused/foreach for steps, torch fused for updates), median and range over the runs.

Usage: python benchmarks/compare_runs.py DIR, where DIR holds {before,after}-{1,2,3}-{step,update}.json
(pytest-benchmark JSON, e.g. benchmarks/results/issue15/).
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
from pathlib import Path


def medians(path: Path) -> dict[str, dict[str, float]]:
    """``{group[size]: {impl: median seconds}}`` of one pytest-benchmark JSON file."""
    out: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for bench in json.loads(path.read_text())["benchmarks"]:
        params = bench.get("params") or {}
        size = params.get("param_set", "")
        out[bench["group"] + (f"[{size}]" if size else "")][params.get("impl", bench["name"])] = bench["stats"][
            "median"
        ]
    return out


def ratios(run: dict[str, dict[str, float]]) -> dict[tuple[str, str], tuple[float, float]]:
    """``(group, impl) -> (ratio to the group's baseline, median ms)``."""
    out = {}
    for group, entries in run.items():
        names = ["torch-fused"] if "update" in group else ["torch-fused", "torch-foreach"]
        present = [entries[n] for n in names if n in entries]
        if not present:
            continue
        baseline = min(present)
        for impl, seconds in entries.items():
            out[(group, impl)] = (seconds / baseline, seconds * 1e3)
    return out


def cell(values: list[tuple[float, float]]) -> str:
    if not values:
        return "-"
    rs = sorted(r for r, _ in values)
    ms = statistics.median(m for _, m in values)
    return f"{statistics.median(rs):.2f}x ({rs[0]:.2f}-{rs[-1]:.2f}x), {ms:.1f} ms"


def main(directory: Path) -> None:
    table: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in sorted(directory.glob("*-*-*.json")):
        side = path.name.split("-")[0]
        for key, value in ratios(medians(path)).items():
            table[key][side].append(value)
    print("| group | entry | before: median ratio (range), median time | after |")
    print("|---|---|---|---|")
    for group, impl in sorted(table):
        print(f"| {group} | {impl} | {cell(table[group, impl]['before'])} | {cell(table[group, impl]['after'])} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
