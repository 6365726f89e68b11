"""What the input checks (issue 16) cost an eager update: two functrain trees in one process, A/B.

Loads functrain from two source trees (e.g. a worktree of the commit before the checks and one of the
commit to measure) under the same name in turn, then times alternating blocks of calls of each, with
one intra-op thread, by thread CPU time (so other processes on a shared machine do not count).
Prints, per case, the median microseconds per call of each tree and their ratio.

    git worktree add /tmp/before 372e758 && git worktree add /tmp/after HEAD
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 \\
        python benchmarks/check_overhead.py /tmp/before /tmp/after

Run it from outside the repository (e.g. ``cd /tmp``), so that neither tree is shadowed by the
checkout. The malloc settings keep glibc from returning and re-faulting the optimiser's buffers
every update, which otherwise adds more noise than the checks cost.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def load(path: str):
    """functrain from ``path``, replacing any functrain already imported."""
    for name in [k for k in sys.modules if k == "functrain" or k.startswith("functrain.")]:
        del sys.modules[name]
    sys.path.insert(0, path)
    try:
        module = importlib.import_module("functrain")
    finally:
        sys.path.remove(path)
    if not module.__file__.startswith(path):
        raise SystemExit(f"functrain came from {module.__file__}, not {path}: run from outside the repository")
    return module


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def trees(kind: str):
    torch.manual_seed(0)
    if kind == "mlp":  # 6 tensors, 670k parameters
        params = {k: v.detach().clone() for k, v in mlp().named_parameters()}
    else:  # 200 tensors of 64 x 64: where per-tensor Python costs show
        params = {f"p{i}": torch.randn(64, 64) for i in range(200)}
    return params, {k: torch.randn_like(v) * 1e-2 for k, v in params.items()}


def update_and_apply(ft, kind):
    params, grads = trees(kind)
    tx = ft.adamw(1e-3)
    box = {"params": params, "state": tx.init(params)}

    def call():
        box["params"], box["state"] = ft.update_and_apply(tx, grads, box["state"], box["params"])

    return call


def update(ft, kind, scheduled=False):
    params, grads = trees(kind)
    lr = ft.schedules.cosine_annealing_lr(1e-3, T_max=1000) if scheduled else 1e-3
    tx = ft.inject_hyperparams(ft.adamw)(lr=lr) if scheduled else ft.adamw(lr)
    box = {"state": tx.init(params)}

    def call():
        _, box["state"] = tx.update(grads, box["state"], params)

    return call


def train_step(ft, kind):
    torch.manual_seed(0)
    model, tx = mlp(), ft.adamw(1e-3)
    step = ft.make_train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), tx)
    box = {"state": ft.TrainState.create(model, tx)}
    batch = (torch.randn(256, 784), torch.randint(0, 10, (256,)))

    def call():
        box["state"], _ = step(box["state"], batch)

    return call


CASES = {
    "update_and_apply adamw, mlp": (update_and_apply, "mlp"),
    "update_and_apply adamw, 200 x (64,64)": (update_and_apply, "many"),
    "update adamw, mlp": (update, "mlp"),
    "update adamw, 200 x (64,64)": (update, "many"),
    "update inject_hyperparams(adamw)(lr=cosine), mlp": (lambda ft, k: update(ft, k, scheduled=True), "mlp"),
    "update inject_hyperparams(adamw)(lr=cosine), 200 x (64,64)": (lambda ft, k: update(ft, k, True), "many"),
    "eager make_train_step, mlp, batch 256": (train_step, "mlp"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="source tree of the reference commit")
    parser.add_argument("after", help="source tree of the commit to measure")
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--per-block", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    versions = {"before": load(args.before), "after": load(args.after)}
    print(f"{'case':58s} {'before us':>10s} {'after us':>10s} {'ratio':>6s}")
    for name, (make, kind) in CASES.items():
        calls = {v: make(ft, kind) for v, ft in versions.items()}
        for call in calls.values():
            for _ in range(30):  # warm: caches, allocator, the first update's checks
                call()
        times: dict[str, list[float]] = {"before": [], "after": []}
        for block in range(args.blocks):
            for v in ("before", "after") if block % 2 else ("after", "before"):
                for _ in range(args.per_block):
                    start = time.thread_time()
                    calls[v]()
                    times[v].append(time.thread_time() - start)
        before, after = (statistics.median(times[v]) * 1e6 for v in ("before", "after"))
        print(f"{name:58s} {before:10.0f} {after:10.0f} {after / before:6.2f}", flush=True)


if __name__ == "__main__":
    main()
