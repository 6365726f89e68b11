"""Time to the first compiled training step, in a process of its own.

    TORCHINDUCTOR_CACHE_DIR=/tmp/some-dir python benchmarks/step_compile_time.py --impl functrain-compiled

prints one JSON object: the seconds to ``import torch`` and ``functrain``, to build the step, to
run the first step (tracing + compiling + running it) and the second (a plain run), with the
compiler's own breakdown and its cache counters. ``bench_step.py`` runs it twice on one fresh
``TORCHINDUCTOR_CACHE_DIR``: *cold* (empty cache: everything is compiled) and *warm* (same cache
dir, new process: inductor's FX graph cache and the AOTAutograd cache can hit, dynamo still traces).
The model is the ``mlp-step`` group's: MLP 784-512-512-10, batch 256, AdamW; ``--model gpt`` takes
the ``gpt-step`` group's GPT (gpt.py: 10.0M parameters, 6 blocks of width 256, 4 x 64 tokens).

``--save-cache FILE`` writes ``ft.save_compile_cache(FILE)`` after the second step (not timed);
``--load-cache FILE`` loads it with ``ft.load_compile_cache(FILE)`` before building the step, counted
in the time to first step (``load_s`` says how much of it); ``--load-graphs-only FILE`` loads only
the part of it that ``torch.compiler.save_cache_artifacts`` wrote, with
``torch.compiler.load_cache_artifacts``: torch's own warm start, without the C++ kernels.

Warm starts (``--compare``): for each model and run, eight fresh processes, each on new, empty cache
directories unless said otherwise:

- *cold*: ``functrain-compiled``, empty cache; it saves the compile cache file;
- *warm*: ``functrain-compiled`` again on the cold run's inductor cache directory;
- *artifacts*: ``functrain-compiled`` on another empty cache directory, the cold run's file loaded
  first: a resumed run, or the same script on another machine with the same software stack;
- *graphs only*: the same with only torch's artifacts loaded (``--load-graphs-only``): what
  ``torch.compiler.load_cache_artifacts`` gives on its own;
- *precompiled cold* and *precompiled*: ``functrain-precompiled`` (``compile={"precompile":
  True}``: the step's trace is saved in the file too), cold on an empty cache directory, saving its
  file; then on another empty cache directory with that file loaded: the trace is loaded, not
  made (``precompiled_traced_nothing`` checks that dynamo's tracing timers never ran);
- *torch cold* and *torch warm*: ``torch.compile(model)`` with fused AdamW, on a cache directory
  of their own: the reference (the target: artifacts <= 1.5x torch warm).

    python benchmarks/step_compile_time.py --compare --models mlp gpt --runs 3 \\
        --out benchmarks/results/compile-cache-cpu.json

writes every run's JSON and, per model and case, the median and range of the time to first step.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gpt  # noqa: E402 - the gpt-step group's model
from step_memory import loss_fn, mlp  # noqa: E402 - the same model and loss as the memory script

import functrain as ft  # noqa: E402

_IMPORTED = time.perf_counter()

IMPLEMENTATIONS = ("functrain-compiled", "functrain-compiled-inplace", "functrain-precompiled", "torch-compiled")
SIZES = {"full": ((784, 512, 512, 10), 256), "smoke": ((8, 4, 4, 3), 8)}
GPT_SIZES = {"full": gpt.FULL, "smoke": gpt.SMOKE}


def make_step(impl: str, model: nn.Module, loss=loss_fn):
    if impl == "torch-compiled":
        compiled = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, fused=True)

        def run(batch) -> None:
            opt.zero_grad()
            loss(compiled, batch).backward()
            opt.step()

        return run
    tx = ft.adamw(lr=1e-3, weight_decay=1e-2)
    compile = {"precompile": True} if impl == "functrain-precompiled" else True
    step = ft.make_train_step(model, loss, tx, compile=compile, inplace=impl.endswith("inplace"))
    carry = {"state": ft.TrainState.create(model, tx)}

    def run(batch) -> None:
        carry["state"], _ = step(carry["state"], batch)

    return run


def _problem(model: str, scale: str):
    """``(build the model, its loss, two batches)`` of the mlp-step or gpt-step group."""
    if model == "gpt":
        cfg = GPT_SIZES[scale]
        return lambda: gpt.gpt(cfg), gpt.lm_loss, gpt.token_batches(cfg, torch.device("cpu"), n=2)
    widths, batch_size = SIZES[scale]
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(batch_size, widths[0], generator=gen), torch.randint(0, widths[-1], (batch_size,), generator=gen))
        for _ in range(2)
    ]
    return lambda: mlp(widths), loss_fn, batches


def _load_graphs_only(path: str) -> bool:
    """Loads the ``torch.compiler.save_cache_artifacts`` bytes in a file ``ft.save_compile_cache`` wrote, alone."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        blobs = [b["name"] for b in json.loads(archive.read("functrain.json"))["blobs"]]
        return all(torch.compiler.load_cache_artifacts(archive.read(name)) is not None for name in blobs)


def _phase_seconds() -> dict[str, float]:
    """The compiler's own timers (seconds summed over calls), e.g. dynamo's tracing
    (``_compile.compile_inner``), AOTAutograd (``create_aot_dispatcher_function``) and inductor
    (``compile_fx_inner``, ``async_compile.wait``); names vary between torch versions."""
    metrics = getattr(torch._dynamo.utils, "compilation_time_metrics", {})
    return {name: round(sum(times), 4) for name, times in metrics.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=IMPLEMENTATIONS)
    parser.add_argument("--model", choices=("mlp", "gpt"), default="mlp")
    parser.add_argument("--scale", choices=sorted(SIZES), default="full")
    parser.add_argument("--save-cache", help="write ft.save_compile_cache(FILE) after the second step")
    parser.add_argument("--load-cache", help="ft.load_compile_cache(FILE) before building the step (timed)")
    parser.add_argument("--load-graphs-only", help="torch.compiler.load_cache_artifacts of FILE's graphs (timed)")
    parser.add_argument("--compare", action="store_true", help="cold / warm / artifacts / torch, see above")
    parser.add_argument("--models", nargs="+", choices=("mlp", "gpt"), default=["mlp"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", help="with --compare: the JSON file to write")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args.models, args.runs, args.scale, args.out)
    if args.impl is None:
        parser.error("--impl is required (or --compare)")
    build_model, loss, batches = _problem(args.model, args.scale)

    t = time.perf_counter()
    loaded = ft.load_compile_cache(args.load_cache) if args.load_cache else None
    if args.load_graphs_only:
        loaded = _load_graphs_only(args.load_graphs_only)
    load_s = time.perf_counter() - t
    run = make_step(args.impl, build_model(), loss)
    built = time.perf_counter()
    run(batches[0])
    first = time.perf_counter()
    run(batches[1])
    second = time.perf_counter()
    if args.save_cache:
        ft.save_compile_cache(args.save_cache)

    counters = torch._dynamo.utils.counters
    return {
        "impl": args.impl,
        "model": args.model,
        "scale": args.scale,
        "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "fx_graph_cache": bool(torch._inductor.config.fx_graph_cache),
        "autograd_cache": bool(torch._functorch.config.enable_autograd_cache),
        "import_s": round(_IMPORTED - _T0, 4),
        "compile_cache_loaded": loaded,
        "load_s": round(load_s, 4),
        "build_s": round(built - t - load_s, 4),
        "first_step_s": round(first - built, 4),
        "second_step_s": round(second - first, 4),
        # time to first step: loading the compile cache (if asked), building the step and running it once
        # (the imports excluded)
        "time_to_first_step_s": round(first - t, 4),
        "fxgraph_cache": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")},
        "autograd_cache_counters": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
        "graphs": counters["stats"].get("unique_graphs", 0),
        "phases_s": _phase_seconds(),
        "torch_version": torch.__version__,
    }


# ----------------------------------------------------------------------------- warm starts (--compare)

CASES = ("cold", "warm", "artifacts", "graphs_only", "precompiled_cold", "precompiled", "torch_cold", "torch_warm")


def _run(args: list[str], cache_dir: str) -> dict:
    """This script in a fresh process on inductor cache directory ``cache_dir`` (and a triton one beside it)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "TRITON_CACHE_DIR": cache_dir + "-triton"}
    for name in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE", "TORCHINDUCTOR_FORCE_DISABLE_CACHES"):
        env.pop(name, None)  # torch's defaults: both caches on
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_once(model: str, scale: str) -> dict[str, dict]:
    """The eight cases of one run, each in a fresh process (see the module docstring)."""
    common = ["--model", model, "--scale", scale]
    with tempfile.TemporaryDirectory(prefix="functrain-compile-time-") as root:
        cache_file = os.path.join(root, "compile-cache.bin")
        runs = {}
        functrain, torch_ = ["--impl", "functrain-compiled", *common], ["--impl", "torch-compiled", *common]
        runs["cold"] = _run([*functrain, "--save-cache", cache_file], os.path.join(root, "cold"))
        runs["warm"] = _run(functrain, os.path.join(root, "cold"))
        runs["artifacts"] = _run([*functrain, "--load-cache", cache_file], os.path.join(root, "artifacts"))
        runs["graphs_only"] = _run([*functrain, "--load-graphs-only", cache_file], os.path.join(root, "graphs"))
        precompiled, precompiled_file = ["--impl", "functrain-precompiled", *common], cache_file + "-precompiled"
        runs["precompiled_cold"] = _run([*precompiled, "--save-cache", precompiled_file], os.path.join(root, "pre"))
        runs["precompiled"] = _run([*precompiled, "--load-cache", precompiled_file], os.path.join(root, "pre-load"))
        runs["torch_cold"] = _run(torch_, os.path.join(root, "torch"))
        runs["torch_warm"] = _run(torch_, os.path.join(root, "torch"))
        runs["artifacts"]["compile_cache_bytes"] = os.path.getsize(cache_file)
        runs["precompiled"]["compile_cache_bytes"] = os.path.getsize(precompiled_file)
    return runs


def compare(models: list[str], n_runs: int, scale: str, out: str | None) -> dict:
    result: dict = {
        "method": __doc__.split("Warm starts")[1].split("    python")[0].strip(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "scale": scale,
        "models": {},
    }
    for model in models:
        runs = []
        for index in range(n_runs):
            runs.append(measure_once(model, scale))
            seconds = {case: runs[-1][case]["time_to_first_step_s"] for case in CASES}
            print(f"{model} run {index + 1}/{n_runs}: {seconds}", file=sys.stderr, flush=True)
        result["models"][model] = {"runs": runs, "summary": _summary(runs)}
        if out:  # after each model: a long GPT measurement interrupted still leaves the MLP's
            _write(out, result)
    return result


def _summary(runs: list[dict[str, dict]]) -> dict:
    def stats(values: list[float]) -> dict[str, float]:
        return {
            "median": round(statistics.median(values), 3),
            "min": round(min(values), 3),
            "max": round(max(values), 3),
        }

    summary = {case: stats([r[case]["time_to_first_step_s"] for r in runs]) for case in CASES}
    # Per run: the two measured within minutes of each other, so the machine's load moves both alike.
    summary["artifacts_over_torch_warm"] = stats(
        [r["artifacts"]["time_to_first_step_s"] / r["torch_warm"]["time_to_first_step_s"] for r in runs]
    )
    summary["precompiled_over_torch_warm"] = stats(
        [r["precompiled"]["time_to_first_step_s"] / r["torch_warm"]["time_to_first_step_s"] for r in runs]
    )
    # A precompiled step loaded from the file traces nothing: dynamo's tracing timers never ran.
    summary["precompiled_traced_nothing"] = all(
        not {"bytecode_tracing", "fullgraph_capture"} & set(r["precompiled"]["phases_s"]) for r in runs
    )
    summary["artifacts_over_cold"] = stats(
        [r["artifacts"]["time_to_first_step_s"] / r["cold"]["time_to_first_step_s"] for r in runs]
    )
    summary["graphs_only_over_cold"] = stats(
        [r["graphs_only"]["time_to_first_step_s"] / r["cold"]["time_to_first_step_s"] for r in runs]
    )
    summary["artifacts_all_hits"] = all(
        r["artifacts"]["fxgraph_cache"].get("fxgraph_cache_miss", 0) == 0
        and r["artifacts"]["autograd_cache_counters"].get("autograd_cache_miss", 0) == 0
        for r in runs
    )
    return summary


def _write(path: str, result: dict) -> None:
    with open(path, "w") as file:
        json.dump(result, file, indent=1)
        file.write("\n")


if __name__ == "__main__":
    out = main()
    # --compare: the summaries (every run is in --out); otherwise the one run, read by the caller
    print(json.dumps({m: r["summary"] for m, r in out["models"].items()} if "models" in out else out))
