"""Quickstart: train a small MLP on scikit-learn's handwritten digits with a functrain optimiser.

The step is a pure function: gradients by ``torch.func.grad`` through ``functional_call``, the
update by ``ft.adamw``. The same run with ``torch.optim.AdamW`` ends at the same parameters up to
float32 rounding, because functrain's optimisers are numerically equal to torch.optim's.

Run: ``python examples/quickstart.py`` (needs scikit-learn, in the ``dev`` extra).
"""

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad

import functrain as ft

torch.manual_seed(0)
digits = load_digits()  # 1797 real 8x8 handwritten digits, shipped inside scikit-learn
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
perm = torch.randperm(len(x))
train, test = perm[:1500], perm[1500:]

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
params = {k: v.detach().clone() for k, v in model.named_parameters()}
initial = {k: v.clone() for k, v in params.items()}


def loss_fn(params, xb, yb):
    return F.cross_entropy(functional_call(model, params, (xb,)), yb)


tx = ft.adamw(lr=3e-3, weight_decay=1e-2)
opt_state = tx.init(params)


def step(params, opt_state, xb, yb):
    grads = grad(loss_fn)(params, xb, yb)
    updates, opt_state = tx.update(grads, opt_state, params)
    return ft.apply_updates(params, updates), opt_state


batches = [train[i : i + 100] for i in range(0, len(train), 100)]
start = time.perf_counter()
for _epoch in range(30):
    for idx in batches:
        params, opt_state = step(params, opt_state, x[idx], y[idx])
elapsed = time.perf_counter() - start

with torch.no_grad():
    accuracy = (functional_call(model, params, (x[test],)).argmax(-1) == y[test]).float().mean().item()
print(f"functrain adamw: held-out accuracy {accuracy:.3f} on {len(test)} digits after 30 epochs ({elapsed:.1f}s)")

# The same training, imperatively, with torch.optim.AdamW.
model.load_state_dict(initial)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
for _epoch in range(30):
    for idx in batches:
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
worst = max(((params[k] - p).norm() / p.norm()).item() for k, p in model.named_parameters())
# Each update agrees with torch.optim to float32 rounding (tests/test_optimisers.py checks 1e-7 in
# float64); over hundreds of steps of training those last-bit differences compound a little.
print(f"torch.optim.AdamW, same data and order: largest relative parameter difference {worst:.1e}")
