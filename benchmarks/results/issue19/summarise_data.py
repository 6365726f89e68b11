import json, statistics, sys
runs = [json.load(open(p)) for p in sys.argv[1:]]
table = {}
for r in runs:
    med = {}
    for b in r["benchmarks"]:
        med.setdefault(b["group"], {})[b["params"]["impl"]] = b["stats"]["median"]
    for g, entries in med.items():
        for e, t in entries.items():
            table.setdefault((g, e), []).append(entries["torch-dataloader"] / t)
for (g, e), rs in sorted(table.items()):
    print(f"{g:20s} {e:22s} throughput ratio {statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})")
