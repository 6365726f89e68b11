"""MAML on sine regression: meta-gradients through unrolled functrain training steps.

Run: ``python examples/maml/train.py`` (about 30 seconds on 2 CPU cores; smoke run: ``--steps 3``).

Model-Agnostic Meta-Learning (Finn et al., 2017, https://arxiv.org/abs/1703.03400) looks for initial
weights from which a few gradient steps on a handful of points fit a new task. Each task here is a
sine wave ``a * sin(x + b)`` (amplitude in [0.1, 5], phase in [0, pi]) seen through K = 10 points.

The inner loop is an ordinary ``ft.make_train_step`` (plain SGD), unrolled. Because the step is a
pure function of tensors, ``torch.func.grad`` differentiates the loss *after* the inner steps with
respect to the *initial* parameters, second-order terms included; ``torch.func.vmap`` runs a
meta-batch of tasks at once. The outer optimiser is ``ft.adam``, used directly as ``(init, update)``.

Prints the mean squared error on new tasks after 0, 1, 5 and 10 adaptation steps, from the
meta-learned initialisation and from the same network before meta-training, and writes
``results.json`` to ``--out`` (default ``runs/maml``).
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=3000, help="meta-training steps")
parser.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-step")
parser.add_argument("--shots", type=int, default=10, help="K: points per task for adapting (and for the query)")
parser.add_argument("--inner-steps", type=int, default=1)
parser.add_argument("--inner-lr", type=float, default=0.01)
parser.add_argument("--meta-lr", type=float, default=1e-3)
parser.add_argument("--out", default="runs/maml")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)


def sample_tasks(n: int, generator: torch.Generator):
    """``n`` sine tasks, each as ``((x_support, y_support), (x_query, y_query))`` with K points apiece."""
    amplitude = torch.empty(n, 1, 1).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(n, 1, 1).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(n, 2 * args.shots, 1).uniform_(-5.0, 5.0, generator=generator)
    y = amplitude * torch.sin(x + phase)
    return (x[:, : args.shots], y[:, : args.shots]), (x[:, args.shots :], y[:, args.shots :])


model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


# ----------------------------------------------------------------------------- the inner loop: plain train steps
inner_tx = ft.sgd(lr=args.inner_lr)
inner_step = ft.make_train_step(model, mse, inner_tx)


def adapt(params, support, steps: int):
    """``steps`` SGD steps on one task's support set, from ``params``; differentiable in ``params``."""
    state = ft.TrainState(params, {}, inner_tx.init(params), torch.zeros((), dtype=torch.int64))
    for _ in range(steps):
        state, _ = inner_step(state, support)
    return state.params


def query_loss(params, task, steps: int):
    support, (x_query, y_query) = task
    adapted = adapt(params, support, steps)
    return F.mse_loss(torch.func.functional_call(model, adapted, (x_query,)), y_query)


def meta_loss(params, tasks):
    """The mean query loss after adaptation, over a meta-batch of tasks (vmapped)."""
    per_task = torch.func.vmap(query_loss, in_dims=(None, 0, None))(params, tasks, args.inner_steps)
    return per_task.mean()


meta_grad = torch.func.grad_and_value(meta_loss)  # d(loss after the inner steps) / d(initial params)

# ----------------------------------------------------------------------------- the outer loop
meta_tx = ft.adam(lr=args.meta_lr)
initial = {name: p.detach().clone() for name, p in model.named_parameters()}
params = dict(initial)
meta_state = meta_tx.init(params)
rng = torch.Generator().manual_seed(args.seed)
start = time.perf_counter()
for it in range(1, args.steps + 1):
    grads, loss = meta_grad(params, sample_tasks(args.meta_batch, rng))
    updates, meta_state = meta_tx.update(grads, meta_state, params)
    params = ft.apply_updates(params, updates)
    if it % 500 == 0 or it == args.steps:
        print(f"meta-step {it:5d}  query loss after {args.inner_steps} inner step(s) {loss.item():.4f}")
elapsed = time.perf_counter() - start

# ----------------------------------------------------------------------------- new tasks
test_tasks = sample_tasks(100, torch.Generator().manual_seed(12345))
evaluate = torch.func.vmap(query_loss, in_dims=(None, 0, None))
results = {}
print(f"\nMean squared error on 100 new tasks after k steps on {args.shots} points (lr {args.inner_lr}):")
print("  k   meta-learned init   before meta-training")
for k in (0, 1, 5, 10):
    results[k] = {
        "maml": evaluate(params, test_tasks, k).mean().item(),
        "baseline": evaluate(initial, test_tasks, k).mean().item(),
    }
    print(f"{k:3d}   {results[k]['maml']:17.4f}   {results[k]['baseline']:20.4f}")
print(f"Meta-training: {args.steps} steps in {elapsed:.0f}s")
(out / "results.json").write_text(json.dumps({"mse_after_k_steps": results, "seconds": elapsed}, indent=2))
