"""Graphs compiled and recompiles over a scheduled training run, in a process of its own.

    python benchmarks/step_recompiles.py --impl functrain-compiled

prints one JSON object. The run is what a training loop does: ``--steps`` (40) steps of a compiled
``ft.make_train_step`` whose AdamW learning rate follows ``ft.schedules.warmup_cosine`` (linear
warm-up over the first 5 steps, then cosine decay to 0 at the last step), with a compiled
``ft.make_eval_step`` on a held-out batch after every ``--eval-every`` (5) steps. The model is the
``mlp-step`` group's (MLP 784-512-512-10, batch 256). The target: one graph for the train step, one
for the eval step, and no recompiles, although the learning rate, the step count and the
parameters change every step and the two compiled functions alternate.

How graphs are counted (the process is fresh, so dynamo starts with empty caches and counters):

1. ``torch._dynamo.utils.counters["stats"]["unique_graphs"]``, which dynamo increments once for
   every graph it compiles, is read before and after every call; the difference is charged to
   that call. A function's graphs are those charged to its calls; a *recompile* is a graph
   charged to any call but a function's first (that first call compiles; every later call must
   find a cached graph whose guards pass). ``fullgraph=True`` rules out graph breaks, so a first
   call compiles exactly one graph.
2. Cross-check: the number of compiled variants dynamo caches on each function's code object
   (``torch._dynamo.eval_frame._debug_get_cache_entry_list``): 1 unless the function recompiled.
   ``None`` where that private helper is missing.
3. The reasons dynamo gives for each recompile (the guard that failed), from its ``recompiles``
   log, so that a miss says what changed.

Dynamo gives up recompiling a function after ``torch._dynamo.config.recompile_limit`` (8)
variants, so a step that recompiled every time would show 8 graphs, not 40; the limit is recorded.
``--resize-batch-at N`` is the negative control: from step N on, the training batches lose a row,
which must show up as one recompile of the train step, with its reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from step_memory import loss_fn, mlp  # noqa: E402 - the mlp-step model and loss

import functrain as ft  # noqa: E402

IMPLEMENTATIONS = ("functrain-compiled", "functrain-compiled-inplace")
SIZES = {"full": ((784, 512, 512, 10), 256), "smoke": ((8, 4, 4, 3), 8)}
PEAK_LR, INIT_LR, WARMUP_STEPS, WEIGHT_DECAY = 1e-3, 1e-4, 5, 1e-2


class RecompileReasons(logging.Handler):
    """Collects dynamo's "Recompiling function ..." messages (the ``recompiles`` log artifact)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []
        self._last: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record is self._last:  # the same record, reaching a second logger this handler is on
            return
        self._last = record
        message = record.getMessage()
        if "Recompiling function" in message:
            self.messages.append(message[:2000])


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _cache_entries(compiled) -> int | None:
    """Compiled variants dynamo holds for the function ``torch.compile`` wrapped."""
    get = getattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list", None)
    orig = getattr(compiled, "_torchdynamo_orig_callable", None)
    if get is None or orig is None:
        return None
    return len(get(orig))


def _median_after_first(seconds: list[float]) -> float | None:
    """The median call time without the first call (which traces and compiles)."""
    return round(statistics.median(seconds[1:] or seconds), 6) if seconds else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, required=True)
    parser.add_argument("--scale", choices=sorted(SIZES), default="full")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=40, help="training steps")
    parser.add_argument("--eval-every", type=int, default=5, help="an eval call after every this many steps")
    parser.add_argument(
        "--resize-batch-at", type=int, default=None, help="check: from this step on, train on batches one row shorter"
    )
    args = parser.parse_args(argv)
    if args.steps <= WARMUP_STEPS or args.eval_every < 1:
        parser.error(f"--steps must be > {WARMUP_STEPS} and --eval-every >= 1")
    device = torch.device(args.device)
    widths, batch_size = SIZES[args.scale]

    reasons = RecompileReasons()
    torch._logging.set_logs(recompiles=True)
    for name in ("torch._dynamo", "torch"):  # the artifact logger propagates to these
        logging.getLogger(name).addHandler(reasons)

    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(batch_size, widths[0], generator=gen).to(device),
            torch.randint(0, widths[-1], (batch_size,), generator=gen).to(device),
        )
        for _ in range(5)
    ]
    train_batches, held_out = batches[:4], batches[4]

    schedule = ft.schedules.warmup_cosine(PEAK_LR, warmup_steps=WARMUP_STEPS, total_steps=args.steps, init_lr=INIT_LR)
    tx = ft.adamw(lr=schedule, weight_decay=WEIGHT_DECAY)
    model = mlp(widths).to(device)
    train = ft.make_train_step(model, loss_fn, tx, compile=True, inplace=args.impl.endswith("inplace"))
    evaluate = ft.make_eval_step(model, loss_fn, compile=True)
    state = ft.TrainState.create(model, tx)

    graphs = {"train": 0, "eval": 0}
    calls = {"train": 0, "eval": 0}
    seconds: dict[str, list[float]] = {"train": [], "eval": []}
    compiled_at: list[dict] = []  # every call that compiled a graph
    recompiles = 0
    losses, eval_losses = [], []

    def call(kind: str, fn, *fn_args):
        nonlocal recompiles
        before, t = _graphs(), time.perf_counter()
        out = fn(*fn_args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[kind].append(time.perf_counter() - t)
        new = _graphs() - before
        if new:
            compiled_at.append({"function": kind, "call": calls[kind], "graphs": new})
            graphs[kind] += new
            if calls[kind] > 0:
                recompiles += new
        calls[kind] += 1
        return out

    for i in range(args.steps):
        batch = train_batches[i % len(train_batches)]
        if args.resize_batch_at is not None and i >= args.resize_batch_at:
            batch = (batch[0][1:], batch[1][1:])
        state, metrics = call("train", train, state, batch)
        losses.append(metrics["loss"])
        if (i + 1) % args.eval_every == 0:
            eval_losses.append(call("eval", evaluate, state, held_out)["loss"])

    lrs = [float(schedule(torch.tensor(t))) for t in range(args.steps)]
    result = {
        "impl": args.impl,
        "scale": args.scale,
        "device": str(device),
        "steps": args.steps,
        "eval_every": args.eval_every,
        "train_calls": calls["train"],
        "eval_calls": calls["eval"],
        "schedule": f"warmup_cosine({PEAK_LR}, {WARMUP_STEPS}, total_steps={args.steps}, init_lr={INIT_LR})",
        "resize_batch_at": args.resize_batch_at,
        "lr_first": lrs[0],
        "lr_max": max(lrs),
        "lr_last": lrs[-1],
        "distinct_lrs": len(set(lrs)),
        # the numbers the target is checked on
        "train_graphs": graphs["train"],
        "eval_graphs": graphs["eval"],
        "recompiles": recompiles,
        "target_met": graphs["train"] == 1 and graphs["eval"] == 1 and recompiles == 0,
        # cross-checks
        "unique_graphs_total": _graphs(),
        "train_cache_entries": _cache_entries(train),
        "eval_cache_entries": _cache_entries(evaluate),
        "compiled_at": compiled_at,
        "recompile_reasons": reasons.messages,
        "recompile_limit": getattr(torch._dynamo.config, "recompile_limit", None),
        # timings (first calls include tracing and compiling)
        "train_first_call_s": round(seconds["train"][0], 4),
        "eval_first_call_s": round(seconds["eval"][0], 4) if seconds["eval"] else None,
        "train_median_s": _median_after_first(seconds["train"]),
        "eval_median_s": _median_after_first(seconds["eval"]),
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
        "eval_losses": [float(x) for x in eval_losses],
        "finite": all(bool(torch.isfinite(p).all()) for p in state.params.values()),
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
