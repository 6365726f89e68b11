"""The GEMM floors of the mlp-step benchmark: its eight matrix products alone, against whole steps.

A training step of the 784-512-512-10 MLP at batch 256 runs three forward ``addmm`` and five
backward ``mm`` (three weight gradients, two input gradients; the input needs none). Eager torch and
``torch.compile`` call ATen's kernels (MKL's sgemm) for them, and inductor's max-autotune keeps
ATen's here, as does functrain's compiled step by default; opted in with ``compile={"cpu_gemm":
"fastest"}``, it runs each on oneDNN where that is faster (functrain/_gemm.py). Each library's time
for the eight bounds the steps that use it from below. This script times the eight products back to
back on each library, then the torch.optim fused step and functrain's compiled in-place step without
and with the GEMM choice, interleaved, and prints each as a fraction of the fused step::

    .venv/bin/python benchmarks/mlp_gemm_floor.py
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F
from bench_step import FASTEST_GEMMS, mlp, mlp_gemms  # benchmarks/, on sys.path as the script's own folder

import functrain as ft
from functrain import _gemm


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
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    ws, bs = [m.weight.detach() for m in linears], [m.bias.detach() for m in linears]
    g3 = torch.randn(256, 10)

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    torch_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-3, weight_decay=1e-2, fused=True)

    def torch_step():
        opt.zero_grad()
        loss_fn(torch_model, (x, y)).backward()
        opt.step()

    def functrain_step(compile):
        tx = ft.adamw(lr=1e-3, weight_decay=1e-2)
        step = ft.make_train_step(model, loss_fn, tx, compile=compile, inplace=True)
        carry = [ft.TrainState.create(model, tx)]

        def run():
            carry[0], _ = step(carry[0], (x, y))

        run()  # compile
        return run

    def onednn_addmm(bias, a, b):
        return _gemm.onednn_mm(a, b, bias)

    timed = {
        "gemms-aten": lambda: mlp_gemms(x, ws, bs, g3, torch.mm, torch.addmm),
        "gemms-onednn": lambda: mlp_gemms(x, ws, bs, g3, _gemm.onednn_mm, onednn_addmm),
        "torch-fused": torch_step,
        "functrain-compiled-inplace": functrain_step(True),
        "functrain-compiled-inplace-fastest-gemm": functrain_step(FASTEST_GEMMS),
    }
    results = {name: [] for name in timed}
    for _ in range(5):  # interleaved, so that drifts in machine speed hit every entry alike
        for name, fn in timed.items():  # (the GEMMs' operands are detached: no graph is recorded)
            results[name].append(median_ms(fn))
    fused = statistics.median(results["torch-fused"])
    for name, values in results.items():
        ms = statistics.median(values)
        print(f"{name:38s} {ms:7.3f} ms  {ms / fused:5.2f}x torch-fused")


if __name__ == "__main__":
    main()
