"""Markdown tables from a pytest-benchmark JSON file: one table per group, each entry's median and
its ratio to the group's baseline, under a header naming the machine the numbers came from, and
the issue's targets checked against the ratios.

    python benchmarks/report.py results.json > table.md
    python benchmarks/report.py results.json -o table.md --baseline adamw-update=torch-fused
    python benchmarks/report.py results.json -o table.md --plot ratios.png

A baseline may be several entries (``--baseline mlp-step=torch-foreach,torch-fused``): the ratios
are then taken against the fastest of them ("best torch eager"). The ``step-memory`` and
``compile-time`` groups (bench_step.py's subprocess measurements) are tabulated from the numbers in
their ``extra_info`` instead of their timings.

The machine (device, torch version, CPU model, core count) is what conftest.py recorded in the JSON
when the benchmarks ran; only for JSON without it is the CPU read from this machine's /proc/cpuinfo.
Standard library only; ``--plot`` needs matplotlib and is skipped, with a note, without it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Iterable
from dataclasses import dataclass

# The entry each group's ratios are taken against, by its parametrize id; a tuple means the
# fastest of those entries (by median) in the run.
BEST_TORCH_EAGER = ("torch-foreach", "torch-fused")
DEFAULT_BASELINES: dict[str, str | tuple[str, ...]] = {
    "adamw-update": "torch-foreach",
    "sgd-momentum-update": "torch-foreach",
    "mlp-step": BEST_TORCH_EAGER,
    "cnn-bn-step": BEST_TORCH_EAGER,
    "resnet18-32-step": BEST_TORCH_EAGER,
    "ensemble": "functrain-sequential-compiled",
    "ensemble-tiny": "functrain-sequential-compiled",
    "step-memory": "torch-foreach",
}
FALLBACK_BASELINE = "torch-foreach"
STEP_GROUPS = (
    "mlp-step",
    "cnn-bn-step",
    "resnet18-32-step",
    "ensemble",
    "ensemble-tiny",
    "compile-time",
    "step-memory",
)


@dataclass(frozen=True)
class Target:
    """``value(entry) / value(against)`` (or its inverse, for a speed-up) compared with ``limit``."""

    group: str
    entry: str
    limit: float
    at_most: bool  # True: ratio <= limit; False: speed-up >= limit
    what: str


# The targets (issue 4). Memory ratios use peak bytes, the others median times.
TARGETS = (
    Target("mlp-step", "functrain-compiled", 0.9, True, "compiled step"),
    Target("mlp-step", "functrain-compiled-inplace", 0.9, True, "compiled in-place step"),
    Target("mlp-step", "functrain-eager", 1.2, True, "eager step"),
    Target("mlp-step", "functrain-eager-inplace", 1.2, True, "eager in-place step"),
    Target("step-memory", "functrain-compiled-inplace", 1.05, True, "peak memory, compiled in-place step"),
    Target("ensemble", "functrain-vmap-compiled", 3.0, False, "K=16 vmapped compiled step"),
    Target("ensemble-tiny", "functrain-vmap-compiled", 3.0, False, "K=16 vmapped compiled step (tiny MLPs)"),
)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _entry_label(bench: dict) -> str:
    return bench.get("param") or bench["name"]


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def machine_lines(data: dict) -> list[str]:
    info = data.get("machine_info", {})
    fb = info.get("functrain_bench", {})
    extra = next((b.get("extra_info", {}) for b in data.get("benchmarks", [])), {})
    cpu = fb.get("cpu_model") or info.get("cpu", {}).get("brand_raw")
    if not cpu:
        cpu = f"{cpu_model()} (read at report time; not recorded in the JSON)"
    cores = fb.get("cpu_count") or info.get("cpu", {}).get("count") or os.cpu_count()
    core_text = f"{cores}"
    if fb.get("cpu_affinity") is not None and fb["cpu_affinity"] != cores:
        core_text += f" ({fb['cpu_affinity']} usable by the process)"
    if fb.get("torch_num_threads") is not None:
        core_text += f", torch threads: {fb['torch_num_threads']}"
    commit = data.get("commit_info", {})
    commit_text = (commit.get("id") or "unknown")[:12] + (" (dirty)" if commit.get("dirty") else "")
    lines = [
        f"- device: {fb.get('device_name') or fb.get('device') or extra.get('device', 'unknown')}",
        f"- torch: {fb.get('torch_version', 'unknown')}",
        f"- CPU: {cpu}",
        f"- cores: {core_text}",
        f"- scale: {fb.get('scale') or extra.get('scale', 'unknown')}",
    ]
    n_params = {b.get("extra_info", {}).get("n_params") for b in data.get("benchmarks", [])}
    if "n_params" in extra and len(n_params) == 1:  # one parameter set for the whole run
        lines.append(f"- parameters: {extra['n_params']:,} float32 in {extra.get('n_tensors', '?')} tensors")
    if fb.get("load_average_start") is not None:
        lines.append(
            f"- load average (1 min, all processes): {fb['load_average_start']:.1f} at the start, "
            f"{fb['load_average_end']:.1f} at the end"
        )
    lines.append(f"- run: {data.get('datetime', 'unknown')}, commit {commit_text}")
    return lines


def pick_baseline(benches: list[dict], baseline: str | tuple[str, ...] | None, value=None) -> tuple[str, bool]:
    """The baseline entry's label, and whether it is the best of several candidates.

    ``value(bench)`` is what "best" minimises (default: the median time)."""
    value = value or (lambda b: b["stats"]["median"])
    labels = [_entry_label(b) for b in benches]
    candidates = [baseline] if isinstance(baseline, str) else list(baseline or ())
    present = [c for c in candidates if c in labels]
    if not present:
        return (FALLBACK_BASELINE if FALLBACK_BASELINE in labels else labels[0]), False
    best = min(present, key=lambda c: value(benches[labels.index(c)]))
    return best, len(present) > 1


def _baseline_text(baseline: str, best_of: bool) -> str:
    return f"the best torch eager entry, `{baseline}`" if best_of else f"`{baseline}`"


def _group_info(benches: list[dict]) -> str:
    extra = benches[0].get("extra_info", {})
    parts = []
    if "n_params" in extra:
        parts.append(f"{extra['n_params']:,} float32 parameters")
    if "k" in extra:
        parts.append(f"K={extra['k']} models")
    if "batch" in extra:
        parts.append(f"batch {extra['batch']}")
    return ", ".join(parts)


def group_table(group: str, benches: list[dict], baseline: str | tuple[str, ...] | None) -> list[str]:
    labels = [_entry_label(b) for b in benches]
    baseline, best_of = pick_baseline(benches, baseline)
    base_median = benches[labels.index(baseline)]["stats"]["median"]
    info = _group_info(benches) if group in STEP_GROUPS else ""
    lines = [
        f"### {group}",
        "",
        *([info + ".", ""] if info else []),
        f"Ratio: median / median of {_baseline_text(baseline, best_of)} (below 1 is faster).",
        "",
        "| implementation | median (ms) | IQR (ms) | min (ms) | rounds | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, bench in zip(labels, benches):
        s = bench["stats"]
        name = f"**{label}**" if label == baseline else label
        ratio = s["median"] / base_median if base_median > 0 else float("nan")
        lines.append(
            f"| {name} | {_ms(s['median'])} | {_ms(s['iqr'])} | {_ms(s['min'])} | {s['rounds']} | {ratio:.2f} |"
        )
    return lines


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _is_memory(benches: list[dict]) -> bool:
    return all("peak_above_base_bytes" in b.get("extra_info", {}) for b in benches)


def _is_compile_time(benches: list[dict]) -> bool:
    return all("cold_s" in b.get("extra_info", {}) for b in benches)


def memory_table(group: str, benches: list[dict], baseline: str | tuple[str, ...] | None) -> list[str]:
    """Peak memory above the import baseline, from step_memory.py's numbers in ``extra_info``."""
    labels = [_entry_label(b) for b in benches]
    peak = {label: b["extra_info"]["peak_above_base_bytes"] for label, b in zip(labels, benches)}
    baseline, _ = pick_baseline(benches, baseline, lambda b: b["extra_info"]["peak_above_base_bytes"])
    first = benches[0]["extra_info"]
    anon = all("peak_anon_above_base_bytes" in b["extra_info"] for b in benches)
    lines = [
        f"### {group}",
        "",
        f"{first['n_params']:,} float32 parameters ({_mib(first['param_bytes'])} MiB); "
        f"{first.get('method', '')}; {first.get('measured_steps', '?')} measured steps after "
        f"{first.get('warmup_steps', '?')} warm-up steps, one subprocess per entry (step_memory.py).",
        "",
        f"Peak: the largest resident memory during the measured steps, minus the process's after "
        f"`import torch, functrain`. Ratio: peak / peak of `{baseline}`.",
        "",
        "| implementation | peak above base (MiB) | ratio | before the steps (MiB) | step's transient (MiB) |"
        + (" anonymous peak (MiB) |" if anon else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if anon else ""),
    ]
    for label, bench in zip(labels, benches):
        e = bench["extra_info"]
        before = e["before_steps_bytes"] - e["base_bytes"]
        row = (
            f"| {f'**{label}**' if label == baseline else label} | {_mib(peak[label])} | "
            f"{peak[label] / peak[baseline]:.2f} | {_mib(before)} | {_mib(peak[label] - before)} |"
        )
        if anon:
            row += f" {_mib(e['peak_anon_above_base_bytes'])} |"
        lines.append(row)
    return lines


def compile_time_table(group: str, benches: list[dict]) -> list[str]:
    """Time to first step, cold and warm compile cache, from step_compile_time.py's numbers."""
    lines = [
        f"### {group}",
        "",
        "Time to the first step of the mlp-step model (building the step + the first call: trace, "
        "compile, run; imports excluded), in fresh processes on one new `TORCHINDUCTOR_CACHE_DIR`: "
        "cold (empty) then warm (the cold run's caches). Second step: an ordinary call, for scale.",
        "",
        "| implementation | cold (s) | warm (s) | warm / cold | FX graph cache (warm) | AOTAutograd cache (warm) "
        "| second step (ms) | import torch+functrain (s) |",
        "|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for bench in benches:
        e = bench["extra_info"]
        warm = e["warm"]
        fx = ", ".join(f"{k.removeprefix('fxgraph_cache_')} {v}" for k, v in warm.get("fxgraph_cache", {}).items())
        aot = ", ".join(
            f"{k.removeprefix('autograd_cache_')} {v}" for k, v in warm.get("autograd_cache_counters", {}).items()
        )
        lines.append(
            f"| {_entry_label(bench)} | {e['cold_s']:.1f} | {e['warm_s']:.1f} | {e['warm_over_cold']:.2f} "
            f"| {fx or '-'} | {aot or '-'} | {warm['second_step_s'] * 1e3:.1f} | {e['import_s']:.1f} |"
        )
    return lines


def _groups(data: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for bench in data.get("benchmarks", []):
        if bench.get("stats"):
            groups.setdefault(bench.get("group") or "(no group)", []).append(bench)
    return groups


def target_lines(groups: dict[str, list[dict]], baselines: dict) -> list[str]:
    """One line per target whose entries ran: the ratio, the target, met or missed."""
    lines = []
    for t in TARGETS:
        benches = groups.get(t.group, [])
        labels = [_entry_label(b) for b in benches]
        if t.entry not in labels:
            continue
        memory = _is_memory(benches)
        value = (lambda b: b["extra_info"]["peak_above_base_bytes"]) if memory else (lambda b: b["stats"]["median"])
        baseline, best_of = pick_baseline(benches, baselines.get(t.group), value)
        if baseline == t.entry:
            continue
        mine, theirs = value(benches[labels.index(t.entry)]), value(benches[labels.index(baseline)])
        if t.at_most:
            ratio, sign = mine / theirs, "<="
            met = ratio <= t.limit
            what = "peak" if memory else "median"
            text = f"{ratio:.2f}x the {what} of {_baseline_text(baseline, best_of)} (target {sign} {t.limit:g}x)"
        else:
            ratio, sign = theirs / mine, ">="
            met = ratio >= t.limit
            text = f"speed-up {ratio:.2f}x over `{baseline}` (median / median; target {sign} {t.limit:g}x)"
        lines.append(f"- {t.group}: {t.what} (`{t.entry}`): {text}: **{'met' if met else 'missed'}**")
    return lines


def render(data: dict, baselines: dict[str, str | tuple[str, ...]], title: str | None = None) -> str:
    groups = _groups(data)
    if not groups:
        raise SystemExit("no timed benchmarks in the JSON (was it written with --benchmark-disable?)")
    if title is None:
        step_run = any(g in STEP_GROUPS for g in groups)
        title = "functrain training-step benchmarks" if step_run else "functrain optimiser benchmarks"
    lines = [f"## {title}", "", *machine_lines(data)]
    targets = target_lines(groups, baselines)
    if targets:
        lines += ["", "### Targets", "", *targets]
    for group, benches in groups.items():
        if _is_memory(benches):
            table = memory_table(group, benches, baselines.get(group))
        elif _is_compile_time(benches):
            table = compile_time_table(group, benches)
        else:
            table = group_table(group, benches, baselines.get(group))
        lines += ["", *table]
    return "\n".join(lines) + "\n"


def plot(data: dict, baselines: dict, path: str) -> bool:
    """A bar chart per timed group of each entry's ratio to its baseline; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = {g: b for g, b in _groups(data).items() if not _is_compile_time(b)}
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.2 * len(groups)), squeeze=False)
    for ax, (group, benches) in zip(axes[:, 0], groups.items()):
        memory = _is_memory(benches)
        value = (lambda b: b["extra_info"]["peak_above_base_bytes"]) if memory else (lambda b: b["stats"]["median"])
        labels = [_entry_label(b) for b in benches]
        baseline, _ = pick_baseline(benches, baselines.get(group), value)
        base = value(benches[labels.index(baseline)])
        ax.barh(labels, [value(b) / base for b in benches])
        ax.axvline(1.0, color="k", linewidth=0.8)
        ax.set_title(f"{group}: {'peak memory' if memory else 'median time'} / {baseline}", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _parse_baselines(pairs: Iterable[str]) -> dict[str, str | tuple[str, ...]]:
    baselines = dict(DEFAULT_BASELINES)
    for pair in pairs:
        group, sep, label = pair.partition("=")
        if not sep:
            raise SystemExit(f"--baseline takes GROUP=ENTRY[,ENTRY...], got {pair!r}")
        labels = tuple(x for x in label.split(",") if x)
        baselines[group] = labels[0] if len(labels) == 1 else labels
    return baselines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="a pytest-benchmark JSON file (pytest --benchmark-json=FILE)")
    parser.add_argument("-o", "--output", help="write the markdown here instead of stdout")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="GROUP=ENTRY",
        help="the entry a group's ratios are taken against, or the fastest of several (ENTRY,ENTRY); "
        "default: torch-foreach, the best torch eager entry for the step groups; repeatable",
    )
    parser.add_argument("--title", help="the markdown heading (default: from the groups in the JSON)")
    parser.add_argument("--plot", metavar="PNG", help="also draw the ratios (needs matplotlib; skipped without)")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    baselines = _parse_baselines(args.baseline)
    text = render(data, baselines, args.title)
    if args.plot and not plot(data, baselines, args.plot):
        print(f"report.py: matplotlib is not installed; no plot written to {args.plot}", file=sys.stderr)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
