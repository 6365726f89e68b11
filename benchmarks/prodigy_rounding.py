"""Why functrain's and prodigyopt's float32 Prodigy steps differ by 5e-4 on bench_frontier's 10M set: one
rounding of the parameter. Two steps (lr 1.0, d0 1e-6) of each, in float32 and float64, from the same
weights (std 0.02) and gradients; prints the checked tensors' change differences, max|a - b| / max|b|.

    .venv/bin/python benchmarks/prodigy_rounding.py

Measured (torch 2.14.1, prodigyopt 1.1.2): float64 functrain vs prodigyopt 9e-13; float32 functrain vs
prodigyopt 5.0e-4; each float32 run vs the float64 one 9.8e-4 (the same for both): the steps move the
weights by a few hundred of their ulps, so one rounding of p + u is 5e-4 of the change.
"""

import pathlib
import sys

import prodigyopt
import torch

import functrain as ft

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_frontier import CHECKED, PRODIGY_KW, FrontierSet, _tree

fs = FrontierSet("10M", blocks=3, width=512, rounds=10, warmup_rounds=3)


def run(dtype, which):
    params = _tree(fs, 0.02, 0, torch.device("cpu"), dtype)
    grads = _tree(fs, 1e-3, 1, torch.device("cpu"), dtype)
    p0 = {k: params[k].clone() for k in CHECKED}
    if which == "ft":
        tx = ft.prodigy(lr=1.0, **PRODIGY_KW)
        st = tx.init(params)
        p = params
        for _ in range(2):
            p, st = ft.update_and_apply(tx, grads, st, p)
    else:
        ps = [torch.nn.Parameter(v.clone()) for v in params.values()]
        opt = prodigyopt.Prodigy(ps, lr=1.0, **PRODIGY_KW)
        for _ in range(2):
            for q, g in zip(ps, grads.values()):
                q.grad = g.clone()
            opt.step()
        p = dict(zip(params, [q.detach() for q in ps]))
    return {k: (p[k] - p0[k]).double() for k in CHECKED}


def rel(a, b):
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in CHECKED)


r = {(d, w): run(d, w) for d in (torch.float32, torch.float64) for w in ("ft", "ref")}
f64 = r[(torch.float64, "ref")]
print("f64 ft vs ref", rel(r[(torch.float64, "ft")], f64))
print("f32 ft vs f32 ref", rel(r[(torch.float32, "ft")], r[(torch.float32, "ref")]))
print("f32 ft vs f64", rel(r[(torch.float32, "ft")], f64), "f32 ref vs f64", rel(r[(torch.float32, "ref")], f64))
