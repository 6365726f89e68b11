"""Median and range over runs of each loader's throughput relative to torch's DataLoader (its epoch time
over the entry's): python summarise_data.py data-run*.json"""

import json
import statistics
import sys

runs = [json.load(open(path)) for path in sys.argv[1:]]
table: dict[tuple[str, str], list[float]] = {}
for run in runs:
    medians: dict[str, dict[str, float]] = {}
    for bench in run["benchmarks"]:
        medians.setdefault(bench["group"], {})[bench["params"]["impl"]] = bench["stats"]["median"]
    for group, entries in medians.items():
        for entry, seconds in entries.items():
            table.setdefault((group, entry), []).append(entries["torch-dataloader"] / seconds)
for (group, entry), ratios in sorted(table.items()):
    print(f"{group:20s} {entry:22s} {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
