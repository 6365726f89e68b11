"""Quickstart: train a small MLP on scikit-learn's handwritten digits with a functrain step.

``ft.make_train_step`` builds a pure ``step(state, batch) -> (state, metrics)`` from the model, a
loss function and an optimiser (here AdamW with a cosine schedule, clipped gradients and no weight
decay on biases, composed in one expression). The same run with ``torch.optim.AdamW`` and
``CosineAnnealingLR`` ends at the same parameters up to float32 rounding, because functrain's
optimisers and schedules are numerically equal to torch's.

Run: ``python examples/quickstart.py`` (needs scikit-learn, in the ``dev`` extra).
"""

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import functrain as ft

torch.manual_seed(0)
digits = load_digits()  # 1797 real 8x8 handwritten digits, shipped inside scikit-learn
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
perm = torch.randperm(len(x))
train, test = perm[:1500], perm[1500:]
batches = [train[i : i + 100] for i in range(0, len(train), 100)]
EPOCHS = 30
STEPS = EPOCHS * len(batches)

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
initial = {k: v.detach().clone() for k, v in model.state_dict().items()}


def loss_fn(model, batch):
    xb, yb = batch
    logits = model(xb)
    return F.cross_entropy(logits, yb), {"acc": (logits.argmax(-1) == yb).float().mean()}


schedule = ft.schedules.cosine_annealing_lr(3e-3, T_max=STEPS)
tx = ft.chain(
    ft.clip_by_global_norm(1.0),
    ft.partition(
        {"decay": ft.adamw(lr=schedule, weight_decay=1e-2), "no_decay": ft.adamw(lr=schedule, weight_decay=0.0)},
        lambda name, p: "decay" if p.ndim >= 2 else "no_decay",
    ),
)
state = ft.TrainState.create(model, tx)
step = ft.make_train_step(model, loss_fn, tx)
evaluate = ft.make_eval_step(model, loss_fn)

start = time.perf_counter()
for _epoch in range(EPOCHS):
    for idx in batches:
        state, metrics = step(state, (x[idx], y[idx]))
elapsed = time.perf_counter() - start
accuracy = evaluate(state, (x[test], y[test]))["acc"].item()
print(f"functrain: held-out accuracy {accuracy:.3f} on {len(test)} digits after {STEPS} steps ({elapsed:.1f}s)")

# The same training, imperatively, with torch.optim.AdamW param groups and CosineAnnealingLR.
model.load_state_dict(initial)
matrices = [p for p in model.parameters() if p.ndim >= 2]
vectors = [p for p in model.parameters() if p.ndim < 2]
opt = torch.optim.AdamW([{"params": matrices}, {"params": vectors, "weight_decay": 0.0}], lr=3e-3, weight_decay=1e-2)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
for _epoch in range(EPOCHS):
    for idx in batches:
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        scheduler.step()
worst = max(((state.params[k] - p).norm() / p.norm()).item() for k, p in model.named_parameters())
# Each update agrees with torch.optim to float32 rounding (the tests check 1e-7 in float64); over
# hundreds of steps those last-bit differences compound a little.
print(f"torch.optim.AdamW + CosineAnnealingLR, same data and order: largest relative parameter difference {worst:.1e}")
