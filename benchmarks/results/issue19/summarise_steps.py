"""Median and range over runs of each entry's step time and its ratio to its group's baseline, for the
issue 19 step groups: python summarise_steps.py step-ensemble-frozen-run*.json"""

import json
import statistics
import sys

BASELINE = {
    "ensemble": "functrain-sequential-compiled",
    "ensemble-tiny": "functrain-sequential-compiled",
    "ensemble-tutorial": "functrain-sequential-compiled",
    "resnet18-frozen-step": "functrain-requires-grad-false",
}


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


runs = [json.load(open(path)) for path in sys.argv[1:]]
table: dict[tuple[str, str], list[tuple[float, float]]] = {}
for run in runs:
    medians: dict[str, dict[str, float]] = {}
    for bench in run["benchmarks"]:
        medians.setdefault(bench["group"], {})[bench["params"]["impl"]] = bench["stats"]["median"] * 1e3
    for group, entries in medians.items():
        for entry, ms in entries.items():
            table.setdefault((group, entry), []).append((ms, ms / entries[BASELINE[group]]))
for (group, entry), values in sorted(table.items()):
    times, ratios = [v[0] for v in values], [v[1] for v in values]
    speedups = [1 / r for r in ratios]
    print(
        f"{group:22s} {entry:34s} {spread(times, '.2f')} ms  ratio {spread(ratios, '.2f')}  "
        f"speed-up {spread(speedups, '.2f')}"
    )
print("torch threads:", {b["extra_info"].get("torch_num_threads") for r in runs for b in r["benchmarks"]})
