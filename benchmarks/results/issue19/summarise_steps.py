import json, statistics, sys
base = {"ensemble": "functrain-sequential-compiled", "ensemble-tiny": "functrain-sequential-compiled",
        "ensemble-tutorial": "functrain-sequential-compiled", "resnet18-frozen-step": "functrain-requires-grad-false"}
runs = [json.load(open(p)) for p in sys.argv[1:]]
table = {}
for r in runs:
    med = {}
    for b in r["benchmarks"]:
        med.setdefault(b["group"], {})[b["params"]["impl"]] = b["stats"]["median"] * 1e3
    for g, entries in med.items():
        for e, t in entries.items():
            table.setdefault((g, e), []).append((t, t / entries[base[g]]))
for (g, e), vals in sorted(table.items()):
    ts = [v[0] for v in vals]; rs = [v[1] for v in vals]
    print(f"{g:22s} {e:34s} {statistics.median(ts):8.2f} ms ({min(ts):.2f}-{max(ts):.2f})  ratio {statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})  speedup {1/statistics.median(rs):.2f}x ({1/max(rs):.2f}-{1/min(rs):.2f})")
print("threads", {b["extra_info"].get("torch_num_threads") for r in runs for b in r["benchmarks"]})
