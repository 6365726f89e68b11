"""Markdown tables from a pytest-benchmark JSON file: one table per group, each entry's median and
its ratio to the group's baseline, under a header naming the machine the numbers came from, and
the issue's targets checked against the ratios.

    python benchmarks/report.py results.json > table.md
    python benchmarks/report.py results.json -o table.md --baseline adamw-update=torch-foreach
    python benchmarks/report.py results.json -o table.md --plot results.png

The optimiser-update groups of bench_optimiser_update.py run on several parameter sets (``param_set``
in each entry's ``extra_info``): they get one table per group and size, and, where the entry
records ``bytes_per_update``, its achieved bandwidth (bytes per update / median time) and that as a
percentage of the ``copy`` entry's bandwidth at the same size (the ``copy-bandwidth`` group: the
device's measured copy bandwidth, the physical limit). ``--plot`` then draws median time and
bandwidth against size for each implementation.

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
    "adamw-update": "torch-fused",
    "sgd-momentum-update": "torch-fused",
    "adafactor-update": "torch-foreach",  # no fused torch.optim Adafactor
    "muon-update": "torch-forloop",  # torch.optim.Muon has only the for-loop
    "lion-update": "functrain",  # no torch.optim Lion: compiled against eager
    "mlp-step": BEST_TORCH_EAGER,
    "mlp-gemms": "aten",
    "cnn-bn-step": BEST_TORCH_EAGER,
    "resnet18-32-step": BEST_TORCH_EAGER,
    "gpt-step": BEST_TORCH_EAGER,
    "ensemble": "functrain-sequential-compiled",
    "ensemble-tiny": "functrain-sequential-compiled",
    "ensemble-tutorial": "functrain-sequential-compiled",
    "resnet18-frozen-step": "functrain-requires-grad-false",
    "step-memory": "torch-foreach",
}
FALLBACK_BASELINE = "torch-foreach"
STEP_GROUPS = (
    "mlp-step",
    "mlp-gemms",
    "cnn-bn-step",
    "resnet18-32-step",
    "gpt-step",
    "ensemble",
    "ensemble-tiny",
    "ensemble-tutorial",
    "resnet18-frozen-step",
    "compile-time",
    "step-recompiles",
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


# The training-step targets (issues 4 and 8: compiled <= 0.9x and eager <= 1.2x the best torch.optim
# eager step, on every full-step model). Memory ratios use peak bytes, the others median times.
_FULL_STEPS = ("mlp-step", "cnn-bn-step", "resnet18-32-step", "gpt-step")
TARGETS = (
    *(
        Target(group, entry, limit, True, what)
        for group in _FULL_STEPS
        for entry, limit, what in (
            ("functrain-compiled", 0.9, "compiled step"),
            ("functrain-compiled-inplace", 0.9, "compiled in-place step"),
            ("functrain-eager", 1.2, "eager step"),
            ("functrain-eager-inplace", 1.2, "eager in-place step"),
        )
    ),
    # The same step with the opt-in GEMM choice (compile={"cpu_gemm": "fastest"}): timing-dependent numbers.
    Target(
        "mlp-step", "functrain-compiled-inplace-fastest-gemm", 0.9, True, "compiled in-place step, opt-in GEMM choice"
    ),
    Target("step-memory", "functrain-compiled-inplace", 1.05, True, "peak memory, compiled in-place step"),
    Target("ensemble", "functrain-vmap-compiled", 3.0, False, "K=16 vmapped compiled step"),
    Target("ensemble-tiny", "functrain-vmap-compiled", 3.0, False, "K=16 vmapped compiled step (tiny MLPs)"),
    # issue 19: the ported ensembling tutorial, and freezing through the optimiser
    Target("ensemble-tutorial", "functrain-vmap-compiled", 1.5, False, "10 MLPs of the ensembling tutorial, vmapped"),
    Target("resnet18-frozen-step", "functrain-partition-frozen", 1.1, True, "frozen backbone via partition"),
)


# The optimiser-update targets (issue 8), for AdamW on the largest parameter set: the compiled update
# at most torch.optim's fused kernel's median time, and at least this fraction of the copy bandwidth.
UPDATE_TARGET_GROUP = "adamw-update"
UPDATE_TARGET_SIZE = "100M"
UPDATE_TARGET_ENTRY = "functrain-compiled"
UPDATE_TARGET_AGAINST = "torch-fused"
UPDATE_TARGET_RATIO = 1.0
UPDATE_TARGET_COPY_FRACTION = {"cpu": 0.70, "cuda": 0.80}
COPY_GROUP = "copy-bandwidth"


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
    """The implementation's id: the ``impl`` parameter (the update groups also take a size parameter)."""
    return (bench.get("params") or {}).get("impl") or bench.get("param") or bench["name"]


def _size(bench: dict) -> str | None:
    """The parameter set's id (``"1M"``...) of an optimiser-update entry; None for the other groups."""
    return bench.get("extra_info", {}).get("param_set")


def _gbps(bench: dict) -> float | None:
    """Achieved bandwidth in GB/s (1e9 bytes): ``bytes_per_update`` / median; None without the bytes."""
    nbytes = bench.get("extra_info", {}).get("bytes_per_update")
    median = bench["stats"]["median"]
    return nbytes / median / 1e9 if nbytes and median > 0 else None


def _gb(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


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
    sets = _param_sets(data)
    if "n_params" in extra and len(n_params) == 1 and not sets:  # one parameter set for the whole run
        lines.append(f"- parameters: {extra['n_params']:,} float32 in {extra.get('n_tensors', '?')} tensors")
    if sets:
        lines.append(
            "- parameter sets (float32, transformer-shaped): "
            + "; ".join(
                f"{name}: {e['n_params']:,} in {e.get('n_tensors', '?')} tensors "
                f"({e.get('layers', '?')} blocks of 4 {e.get('width', '?')}x{e.get('width', '?')} matrices + 8 vectors)"
                for name, e in sets.items()
            )
        )
    if fb.get("load_average_start") is not None:
        lines.append(
            f"- load average (1 min, all processes): {fb['load_average_start']:.1f} at the start, "
            f"{fb['load_average_end']:.1f} at the end"
        )
    lines.append(f"- run: {data.get('datetime', 'unknown')}, commit {commit_text}")
    return lines


def _param_sets(data: dict) -> dict[str, dict]:
    """The optimiser-update parameter sets that ran, by id, smallest first: one whole-set entry's extra_info each."""
    sets: dict[str, dict] = {}
    for bench in data.get("benchmarks", []):
        e = bench.get("extra_info", {})
        # Muon's entries update two matrices of the set: take an entry that covers the whole set.
        if _size(bench) and "layers" in e and e.get("optimizer") not in ("muon", "copy"):
            sets.setdefault(_size(bench), e)
    return dict(sorted(sets.items(), key=lambda kv: kv[1]["n_params"]))


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


def group_table(
    group: str, benches: list[dict], baseline: str | tuple[str, ...] | None, copy: dict | None = None
) -> list[str]:
    """A group's table (for the update groups, one size's): median, IQR, min, rounds, ratio, and the
    achieved bandwidth and its fraction of ``copy``'s (the copy entry at the same size) where known."""
    labels = [_entry_label(b) for b in benches]
    baseline, best_of = pick_baseline(benches, baseline)
    base_median = benches[labels.index(baseline)]["stats"]["median"]
    size = _size(benches[0])
    if size is not None:
        info = _size_info(size, benches)
    else:
        info = _group_info(benches) if group in STEP_GROUPS else ""
    bandwidth = any(_gbps(b) is not None for b in benches)
    copy_gbps = _gbps(copy) if copy else None
    lines = [
        f"### {group}" + (f", {size}" if size is not None else ""),
        "",
        *([info + ".", ""] if info else []),
        f"Ratio: median / median of {_baseline_text(baseline, best_of)} (below 1 is faster).",
    ]
    if bandwidth:
        lines.append(
            "GB/s: bytes the update must move (see `TRAFFIC` in bench_optimiser_update.py) / median; "
            + (
                f"% of copy: of the measured limit at this size, `{_entry_label(copy)}`'s {_gb(copy_gbps)} GB/s "
                f"(median {_ms(copy['stats']['median'])} ms; see copy-bandwidth)."
                if copy_gbps
                else "no `copy` entry at this size in the run."
            )
        )
    lines += [
        "",
        "| implementation | median (ms) | IQR (ms) | min (ms) | rounds | ratio |"
        + (" GB/s | % of copy |" if bandwidth else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if bandwidth else ""),
    ]
    for label, bench in zip(labels, benches):
        s = bench["stats"]
        name = f"**{label}**" if label == baseline else label
        ratio = s["median"] / base_median if base_median > 0 else float("nan")
        row = f"| {name} | {_ms(s['median'])} | {_ms(s['iqr'])} | {_ms(s['min'])} | {s['rounds']} | {ratio:.2f} |"
        if bandwidth:
            gbps = _gbps(bench)
            row += " - | - |" if gbps is None else f" {_gb(gbps)} | {_pct(gbps / copy_gbps if copy_gbps else None)} |"
        lines.append(row)
    return lines


def _size_info(size: str, benches: list[dict]) -> str:
    e = benches[0].get("extra_info", {})
    text = f"Parameter set {size}: {e['n_params']:,} float32 parameters in {e.get('n_tensors', '?')} tensors"
    if e.get("optimizer") == "muon":
        text += " (two matrices of the set)"
    return text


def copy_table(benches: list[dict]) -> list[str]:
    """The measured copy bandwidth at each size: the limit the update groups' % of copy refers to."""
    lines = [
        f"### {COPY_GROUP}",
        "",
        "Over flat float32 tensors of each parameter set's element count: `copy` is `dst.copy_(src)`, "
        "GB/s = 2 x 4 bytes x N (read src, write dst) / median; `add-inplace` is `a.add_(b)`, 3 x 4 bytes x N. "
        "A CPU store to a line it has not read first reads it (write-allocate), traffic the copy's count "
        "misses; `a.add_(b)` reads every line it writes, as an in-place update does. The limit the "
        "updates' % of copy refers to is the faster of the two at each size.",
        "",
        "| size | measurement | elements | median (ms) | IQR (ms) | min (ms) | rounds | GB/s | GB/s at min |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for bench in sorted(benches, key=lambda b: (b["extra_info"]["n_params"], _entry_label(b))):
        s, e = bench["stats"], bench["extra_info"]
        lines.append(
            f"| {_size(bench)} | {_entry_label(bench)} | {e['n_params']:,} | {_ms(s['median'])} | {_ms(s['iqr'])} "
            f"| {_ms(s['min'])} | "
            f"{s['rounds']} | {_gb(_gbps(bench))} | {_gb(e['bytes_per_update'] / s['min'] / 1e9)} |"
        )
    return lines


def _by_size(benches: list[dict]) -> dict[str, list[dict]]:
    """An update group's entries split by parameter set, smallest set first."""
    sizes: dict[str, list[dict]] = {}
    for bench in sorted(benches, key=lambda b: b["extra_info"].get("n_params", 0)):
        sizes.setdefault(_size(bench), []).append(bench)
    return sizes


def _copy_at(groups: dict[str, list[dict]], size: str) -> dict | None:
    """The fastest (by GB/s) of the copy-bandwidth entries at ``size``: the device's measured limit."""
    at_size = [b for b in groups.get(COPY_GROUP, []) if _size(b) == size]
    return max(at_size, key=_gbps, default=None)


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


def _is_recompiles(benches: list[dict]) -> bool:
    return all("recompiles" in b.get("extra_info", {}) for b in benches)


def recompiles_table(group: str, benches: list[dict]) -> list[str]:
    """Graphs compiled over a scheduled run with interleaved eval, from step_recompiles.py's numbers."""
    e0 = benches[0]["extra_info"]
    lines = [
        f"### {group}",
        "",
        f"{e0['train_calls']} compiled train steps of the mlp-step model with `{e0['schedule']}` "
        f"({e0['distinct_lrs']} distinct learning rates) and a compiled eval step every {e0['eval_every']} steps, "
        "in a fresh process. Graphs: dynamo's graph count read around every call; a recompile is a graph "
        "made by any call but a function's first.",
        "",
        "| implementation | train graphs | eval graphs | recompiles | cached versions (train, eval) "
        "| loss first → last |",
        "|---|---:|---:|---:|---|---|",
    ]
    for bench in benches:
        e = bench["extra_info"]
        lines.append(
            f"| {_entry_label(bench)} | {e['train_graphs']} | {e['eval_graphs']} | {e['recompiles']} "
            f"| {e['train_cache_entries']}, {e['eval_cache_entries']} | {e['first_loss']:.3f} → {e['last_loss']:.3f} |"
        )
    return lines


def recompile_target_lines(groups: dict[str, list[dict]]) -> list[str]:
    """One train graph, one eval graph and no recompile over the scheduled run, per entry."""
    benches = [b for g in groups.values() if _is_recompiles(g) for b in g]
    return [
        f"- step-recompiles: `{_entry_label(b)}`: {b['extra_info']['train_graphs']} train graph(s), "
        f"{b['extra_info']['eval_graphs']} eval graph(s), {b['extra_info']['recompiles']} recompiles "
        f"(target 1, 1, 0): **{'met' if b['extra_info']['target_met'] else 'missed'}**"
        for b in benches
    ]


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


def update_target_lines(groups: dict[str, list[dict]]) -> list[str]:
    """The optimiser-update targets (AdamW, largest set): compiled vs torch-fused, and % of copy bandwidth."""
    benches = [b for b in groups.get(UPDATE_TARGET_GROUP, []) if _size(b) == UPDATE_TARGET_SIZE]
    by_label = {_entry_label(b): b for b in benches}
    mine = by_label.get(UPDATE_TARGET_ENTRY)
    if mine is None:
        return []
    n = mine["extra_info"]["n_params"]
    where = f"{UPDATE_TARGET_GROUP}, {UPDATE_TARGET_SIZE} ({n:,} parameters)"
    lines = []
    theirs = by_label.get(UPDATE_TARGET_AGAINST)
    if theirs is not None:
        ratio = mine["stats"]["median"] / theirs["stats"]["median"]
        met = ratio <= UPDATE_TARGET_RATIO
        lines.append(
            f"- {where}: compiled update (`{UPDATE_TARGET_ENTRY}`): {_ms(mine['stats']['median'])} ms, "
            f"{ratio:.2f}x the median of `{UPDATE_TARGET_AGAINST}` ({_ms(theirs['stats']['median'])} ms; "
            f"target <= {UPDATE_TARGET_RATIO:g}x): **{'met' if met else 'missed'}**"
        )
    copy = _copy_at(groups, UPDATE_TARGET_SIZE)
    if copy is not None and _gbps(mine) is not None:
        device = str(mine["extra_info"].get("device", "cpu")).split(":")[0]
        limit = UPDATE_TARGET_COPY_FRACTION.get(device, UPDATE_TARGET_COPY_FRACTION["cuda"])
        fraction = _gbps(mine) / _gbps(copy)
        others = ", ".join(
            f"`{label}` {_pct(_gbps(b) / _gbps(copy))}"
            for label, b in by_label.items()
            if label != UPDATE_TARGET_ENTRY and _gbps(b) is not None
        )
        lines.append(
            f"- {where}: compiled update (`{UPDATE_TARGET_ENTRY}`): {_gb(_gbps(mine))} GB/s, "
            f"{_pct(fraction)} of the measured copy bandwidth (`{_entry_label(copy)}`, {_gb(_gbps(copy))} GB/s; "
            f"target >= {_pct(limit)} on {device}): "
            f"**{'met' if fraction >= limit else 'missed'}**" + (f" (the others: {others})" if others else "")
        )
    return lines


def render(data: dict, baselines: dict[str, str | tuple[str, ...]], title: str | None = None) -> str:
    groups = _groups(data)
    if not groups:
        raise SystemExit("no timed benchmarks in the JSON (was it written with --benchmark-disable?)")
    if title is None:
        step_run = any(g in STEP_GROUPS for g in groups)
        title = "functrain training-step benchmarks" if step_run else "functrain optimiser benchmarks"
    lines = [f"## {title}", "", *machine_lines(data)]
    targets = update_target_lines(groups) + target_lines(groups, baselines) + recompile_target_lines(groups)
    if targets:
        lines += ["", "### Targets", "", *targets]
    for group, benches in groups.items():
        if group == COPY_GROUP:
            table = copy_table(benches)
        elif _size(benches[0]) is not None:
            table = []
            for size, sized in _by_size(benches).items():
                table += ["", *group_table(group, sized, baselines.get(group), _copy_at(groups, size))]
            table = table[1:]
        elif _is_memory(benches):
            table = memory_table(group, benches, baselines.get(group))
        elif _is_compile_time(benches):
            table = compile_time_table(group, benches)
        elif _is_recompiles(benches):
            table = recompiles_table(group, benches)
        else:
            table = group_table(group, benches, baselines.get(group))
        lines += ["", *table]
    return "\n".join(lines) + "\n"


def plot(data: dict, baselines: dict, path: str) -> bool:
    """Draws the run into a PNG; False without matplotlib.

    An update group run at several sizes gets a row of two panels, median time and achieved bandwidth
    against the parameter count, one line per implementation, with the copy bandwidth as the limit
    in the second; every other timed group a bar chart of each entry's ratio to its baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    all_groups = _groups(data)
    sweeps = {
        g: b
        for g, b in all_groups.items()
        if g != COPY_GROUP and len({_size(x) for x in b} - {None}) > 1 and all(_gbps(x) is not None for x in b)
    }
    bars = {
        g: b
        for g, b in all_groups.items()
        if g not in sweeps and g != COPY_GROUP and not _is_compile_time(b) and not _is_recompiles(b)
    }
    if not sweeps and not bars:
        return True
    heights = [3.2] * len(sweeps) + [max(1.6, 0.3 * len(b) + 0.8) for b in bars.values()]
    fig = plt.figure(figsize=(11, sum(heights)))
    grid = fig.add_gridspec(len(heights), 2, height_ratios=heights)
    limits = (_copy_at(all_groups, size) for size in {_size(b) for b in all_groups.get(COPY_GROUP, [])})
    copies = sorted((b for b in limits if b is not None), key=lambda b: b["extra_info"]["n_params"])
    for row, (group, benches) in enumerate(sweeps.items()):
        time_ax, bw_ax = fig.add_subplot(grid[row, 0]), fig.add_subplot(grid[row, 1])
        labels = list(dict.fromkeys(_entry_label(b) for b in benches))
        for label in labels:
            points = sorted(
                (b["extra_info"]["n_params"], b["stats"]["median"], _gbps(b))
                for b in benches
                if _entry_label(b) == label
            )
            n, median, gbps = zip(*points)
            style = dict(marker="o", markersize=4, linewidth=1.2, label=label)
            time_ax.plot(n, [m * 1e3 for m in median], **style)
            bw_ax.plot(n, gbps, **style)
        if copies:
            n = [b["extra_info"]["n_params"] for b in copies]
            limit = "measured limit (faster of copy, add-inplace)"
            bw_ax.plot(n, [_gbps(b) for b in copies], "k--", marker="s", markersize=4, linewidth=1.2, label=limit)
        time_ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="median (ms)")
        bw_ax.set(xscale="log", xlabel="parameters", ylabel="GB/s (bytes per update / median)")
        bw_ax.set_ylim(bottom=0)
        time_ax.set_title(f"{group}: median time per update", fontsize=9)
        bw_ax.set_title(f"{group}: achieved bandwidth (copy: the limit)", fontsize=9)
        for ax in (time_ax, bw_ax):
            ax.grid(True, which="both", linewidth=0.3)
            ax.tick_params(labelsize=8)
        bw_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    for row, (group, benches) in enumerate(bars.items(), start=len(sweeps)):
        ax = fig.add_subplot(grid[row, :])
        memory = _is_memory(benches)
        value = (lambda b: b["extra_info"]["peak_above_base_bytes"]) if memory else (lambda b: b["stats"]["median"])
        labels = [_entry_label(b) for b in benches]
        baseline, _ = pick_baseline(benches, baselines.get(group), value)
        base = value(benches[labels.index(baseline)])
        size = _size(benches[0])
        ax.barh(labels, [value(b) / base for b in benches])
        ax.axvline(1.0, color="k", linewidth=0.8)
        where = f" ({size})" if size else ""
        ax.set_title(f"{group}{where}: {'peak memory' if memory else 'median time'} / {baseline}", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
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
        "default: torch-fused for the AdamW and SGD updates (torch-foreach for the others), the best torch "
        "eager entry for the step groups; repeatable",
    )
    parser.add_argument("--title", help="the markdown heading (default: from the groups in the JSON)")
    parser.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw the run: time and bandwidth vs size for the update sweeps, ratio bars for the other groups "
        "(needs matplotlib; skipped without)",
    )
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
