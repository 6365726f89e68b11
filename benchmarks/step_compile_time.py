"""Time to the first compiled training step, in a process of its own.

    TORCHINDUCTOR_CACHE_DIR=/tmp/some-dir python benchmarks/step_compile_time.py --impl functrain-compiled

prints one JSON object: the seconds to ``import torch`` and ``functrain``, to build the step, to
run the first step (tracing + compiling + running it) and the second (a plain run), with the
compiler's own breakdown and its cache counters. ``bench_step.py`` runs it twice on one fresh
``TORCHINDUCTOR_CACHE_DIR``: *cold* (empty cache: everything is compiled) and *warm* (same cache
dir, new process: inductor's FX graph cache and the AOTAutograd cache can hit, dynamo still traces).
The model is the ``mlp-step`` group's: MLP 784-512-512-10, batch 256, AdamW.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from step_memory import loss_fn, mlp  # noqa: E402 - the same model and loss as the memory script

import functrain as ft  # noqa: E402

_IMPORTED = time.perf_counter()

IMPLEMENTATIONS = ("functrain-compiled", "functrain-compiled-inplace", "torch-compiled")
SIZES = {"full": ((784, 512, 512, 10), 256), "smoke": ((8, 4, 4, 3), 8)}


def make_step(impl: str, model: nn.Module):
    if impl == "torch-compiled":
        compiled = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, fused=True)

        def run(batch) -> None:
            opt.zero_grad()
            loss_fn(compiled, batch).backward()
            opt.step()

        return run
    tx = ft.adamw(lr=1e-3, weight_decay=1e-2)
    step = ft.make_train_step(model, loss_fn, tx, compile=True, inplace=impl.endswith("inplace"))
    carry = {"state": ft.TrainState.create(model, tx)}

    def run(batch) -> None:
        carry["state"], _ = step(carry["state"], batch)

    return run


def _phase_seconds() -> dict[str, float]:
    """The compiler's own timers (seconds summed over calls), e.g. dynamo's tracing
    (``_compile.compile_inner``), AOTAutograd (``create_aot_dispatcher_function``) and inductor
    (``compile_fx_inner``, ``async_compile.wait``); names vary between torch versions."""
    metrics = getattr(torch._dynamo.utils, "compilation_time_metrics", {})
    return {name: round(sum(times), 4) for name, times in metrics.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, required=True)
    parser.add_argument("--scale", choices=sorted(SIZES), default="full")
    args = parser.parse_args(argv)
    widths, batch_size = SIZES[args.scale]
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(batch_size, widths[0], generator=gen), torch.randint(0, widths[-1], (batch_size,), generator=gen))
        for _ in range(2)
    ]

    t = time.perf_counter()
    run = make_step(args.impl, mlp(widths))
    built = time.perf_counter()
    run(batches[0])
    first = time.perf_counter()
    run(batches[1])
    second = time.perf_counter()

    counters = torch._dynamo.utils.counters
    return {
        "impl": args.impl,
        "scale": args.scale,
        "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "fx_graph_cache": bool(torch._inductor.config.fx_graph_cache),
        "autograd_cache": bool(torch._functorch.config.enable_autograd_cache),
        "import_s": round(_IMPORTED - _T0, 4),
        "build_s": round(built - t, 4),
        "first_step_s": round(first - built, 4),
        "second_step_s": round(second - first, 4),
        # time to first step: building the step and running it once (the imports excluded)
        "time_to_first_step_s": round(first - t, 4),
        "fxgraph_cache": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")},
        "autograd_cache_counters": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
        "graphs": counters["stats"].get("unique_graphs", 0),
        "phases_s": _phase_seconds(),
        "torch_version": torch.__version__,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
