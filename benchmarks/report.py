"""Markdown tables from a pytest-benchmark JSON file: one table per group, each entry's median and
its ratio to the group's baseline, under a header naming the machine the numbers came from.

    python benchmarks/report.py results.json > table.md
    python benchmarks/report.py results.json -o table.md --baseline adamw-update=torch-fused

The machine (device, torch version, CPU model, core count) is what conftest.py recorded in the JSON
when the benchmarks ran; only for JSON without it is the CPU read from this machine's /proc/cpuinfo.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Iterable

# The entry each group's ratios are taken against, by its parametrize id.
DEFAULT_BASELINES = {
    "adamw-update": "torch-foreach",
    "sgd-momentum-update": "torch-foreach",
}
FALLBACK_BASELINE = "torch-foreach"


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
    if "n_params" in extra:
        lines.append(f"- parameters: {extra['n_params']:,} float32 in {extra.get('n_tensors', '?')} tensors")
    lines.append(f"- run: {data.get('datetime', 'unknown')}, commit {commit_text}")
    return lines


def group_table(group: str, benches: list[dict], baseline: str | None) -> list[str]:
    labels = [_entry_label(b) for b in benches]
    if baseline not in labels:
        baseline = FALLBACK_BASELINE if FALLBACK_BASELINE in labels else labels[0]
    base_median = benches[labels.index(baseline)]["stats"]["median"]
    lines = [
        f"### {group}",
        "",
        f"Ratio: median / median of `{baseline}` (below 1 is faster).",
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


def render(data: dict, baselines: dict[str, str]) -> str:
    groups: dict[str, list[dict]] = {}
    for bench in data.get("benchmarks", []):
        if bench.get("stats"):
            groups.setdefault(bench.get("group") or "(no group)", []).append(bench)
    if not groups:
        raise SystemExit("no timed benchmarks in the JSON (was it written with --benchmark-disable?)")
    lines = ["## functrain optimiser benchmarks", "", *machine_lines(data)]
    for group, benches in groups.items():
        lines += ["", *group_table(group, benches, baselines.get(group))]
    return "\n".join(lines) + "\n"


def _parse_baselines(pairs: Iterable[str]) -> dict[str, str]:
    baselines = dict(DEFAULT_BASELINES)
    for pair in pairs:
        group, sep, label = pair.partition("=")
        if not sep:
            raise SystemExit(f"--baseline takes GROUP=ENTRY, got {pair!r}")
        baselines[group] = label
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
        help="the entry a group's ratios are taken against (default: torch-foreach); repeatable",
    )
    args = parser.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    text = render(data, _parse_baselines(args.baseline))
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
