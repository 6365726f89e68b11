"""The GEMM floor of the mlp-step benchmark: its eight matrix products alone, against whole steps.

A training step of the 784-512-512-10 MLP at batch 256 runs three forward ``addmm`` and five
backward ``mm`` (three weight gradients, two input gradients; the input needs none). Eager torch,
``torch.compile`` and functrain's compiled step all call the same ATen kernels for them (inductor's
max-autotune keeps ATen's here), so their time bounds every step from below. This script times the
eight products back to back, then the torch.optim fused step and functrain's compiled in-place step,
interleaved, and prints each as a fraction of the fused step::

    .venv/bin/python benchmarks/mlp_gemm_floor.py
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F
from bench_step import mlp  # benchmarks/, on sys.path as the script's own folder

import functrain as ft


def gemms(x, w1, b1, w2, b2, w3, b3, g3):
    """The step's eight products, with the shapes (and transposes) autograd uses."""
    h1 = torch.addmm(b1, x, w1.t())
    h2 = torch.addmm(b2, h1, w2.t())
    torch.addmm(b3, h2, w3.t())
    g2 = g3 @ w3  # input gradients of layers 3 and 2
    g1 = g2 @ w2
    g3.t() @ h2  # weight gradients
    g2.t() @ h1
    g1.t() @ x


def median_ms(fn, rounds: int = 60, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    model = mlp((784, 512, 512, 10))
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    w = [p.detach() for p in model.parameters()]
    g3 = torch.randn(256, 10)

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    torch_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-3, weight_decay=1e-2, fused=True)

    def torch_step():
        opt.zero_grad()
        loss_fn(torch_model, (x, y)).backward()
        opt.step()

    tx = ft.adamw(lr=1e-3, weight_decay=1e-2)
    step = ft.make_train_step(model, loss_fn, tx, compile=True, inplace=True)
    carry = [ft.TrainState.create(model, tx)]

    def functrain_step():
        carry[0], _ = step(carry[0], (x, y))

    functrain_step()  # compile
    results = {"gemms": [], "torch-fused": [], "functrain-compiled-inplace": []}
    for _ in range(5):  # interleaved, so that drifts in machine speed hit all three alike
        results["gemms"].append(median_ms(lambda: gemms(x, *w, g3)))
        results["torch-fused"].append(median_ms(torch_step))
        results["functrain-compiled-inplace"].append(median_ms(functrain_step))
    fused = statistics.median(results["torch-fused"])
    for name, values in results.items():
        ms = statistics.median(values)
        print(f"{name:28s} {ms:7.3f} ms  {ms / fused:5.2f}x torch-fused")


if __name__ == "__main__":
    main()
