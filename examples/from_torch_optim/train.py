"""The same training three ways: imperative torch.optim, a functrain step, and functrain inside the torch loop.

Run: ``python examples/from_torch_optim/train.py`` (seconds; smoke run: ``--steps 3``).

A small CNN with BatchNorm on the digits, trained with SGD (Nesterov momentum), weight decay on the
weights but not on biases and BatchNorm parameters (two param groups), gradient clipping and a
one-cycle learning-rate schedule:

1. imperatively: ``torch.optim.SGD`` + ``clip_grad_norm_`` + ``OneCycleLR``;
2. functionally: one ``ft.chain`` expression and ``ft.make_train_step``;
3. the functrain optimiser behind the ``torch.optim.Optimizer`` interface (``ft.TorchOptimizer``),
   dropped into the loop of 1 unchanged: the way to migrate a codebase one piece at a time.

All three see the same initial weights and the same batches; the script prints the largest
parameter and BatchNorm-statistic differences. In float64 (the default) they agree to ~1e-15:
functrain's optimisers and schedules compute torch.optim's numbers. ``--dtype float32`` shows
float32 rounding instead.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--steps", type=int, help="train this many steps instead of --epochs (smoke runs)")
parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
args = parser.parse_args()
torch.set_default_dtype(getattr(torch, args.dtype))
torch.manual_seed(0)

loader = ft.data.make_loader(ft.data.digits("train"), batch_size=64, seed=0, dtype=torch.get_default_dtype())
batches = [batch for _ in range(args.epochs) for batch in loader][: args.steps]  # the same batches for every run
test = ft.data.digits("test")
test_x, test_y = test.images.to(torch.get_default_dtype()) / 255, test.labels
STEPS, MAX_LR, WD, CLIP = len(batches), 0.1, 5e-4, 1.0

model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)
)
initial = {k: v.clone() for k, v in model.state_dict().items()}
decays = lambda name, p: p.ndim >= 2  # weight matrices and kernels decay; biases and BN scales do not


def accuracy(logits):
    return (logits.argmax(-1) == test_y).float().mean().item()


# ----------------------------------------------------------------------------- 1. torch.optim
start = time.perf_counter()
named = list(model.named_parameters())
opt = torch.optim.SGD(
    [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": WD},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ],
    lr=MAX_LR,
    momentum=0.9,
    nesterov=True,
)
# OneCycleLR also cycles the momentum unless told not to; ft.schedules.one_cycle_lr schedules the lr
# only (a momentum schedule would be a second schedule, passed as momentum=).
scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, total_steps=STEPS, cycle_momentum=False)
model.train()
for x, y in batches:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    scheduler.step()
model.eval()
with torch.no_grad():
    torch_acc = accuracy(model(test_x))
torch_result = {k: v.clone() for k, v in model.state_dict().items()}
print(f"1. torch.optim.SGD + OneCycleLR:       held-out acc {torch_acc:.4f}  ({time.perf_counter() - start:.1f}s)")

# ----------------------------------------------------------------------------- 2. functrain
start = time.perf_counter()
model.load_state_dict(initial)


def loss_fn(model, batch):  # what the loop body computed, as a function of the model and a batch
    x, y = batch
    return F.cross_entropy(model(x), y)


schedule = ft.schedules.one_cycle_lr(MAX_LR, total_steps=STEPS)  # == OneCycleLR, as a function of the step
tx = ft.chain(
    ft.clip_by_global_norm(CLIP),  # == clip_grad_norm_
    ft.partition(  # == the two param groups
        {
            "decay": ft.sgd(lr=schedule, momentum=0.9, nesterov=True, weight_decay=WD),
            "no_decay": ft.sgd(lr=schedule, momentum=0.9, nesterov=True, weight_decay=0.0),
        },
        lambda name, p: "decay" if decays(name, p) else "no_decay",
    ),
)
state = ft.TrainState.create(model, tx)  # params, BatchNorm buffers, optimiser state, step count
step = ft.make_train_step(model, loss_fn, tx)
for batch in batches:
    state, metrics = step(state, batch)
functional_acc = accuracy(torch.func.functional_call(model.eval(), {**state.params, **state.buffers}, (test_x,)))
functional_result = {**state.params, **state.buffers}
print(f"2. functrain make_train_step:          held-out acc {functional_acc:.4f}  ({time.perf_counter() - start:.1f}s)")

# ----------------------------------------------------------------------------- 3. functrain inside the torch loop
start = time.perf_counter()
model.load_state_dict(initial)
opt = ft.TorchOptimizer(model.named_parameters(), tx)  # the same tx; names reach partition's labels
model.train()
for x, y in batches:  # the loop of 1, unchanged (the schedule lives in tx, so no scheduler.step())
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
model.eval()
with torch.no_grad():
    adapter_acc = accuracy(model(test_x))
adapter_result = {k: v.clone() for k, v in model.state_dict().items()}
print(f"3. ft.TorchOptimizer in the torch loop: held-out acc {adapter_acc:.4f}  ({time.perf_counter() - start:.1f}s)")


# ----------------------------------------------------------------------------- the comparison
def max_difference(a, b, keys):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


params = [n for n, _ in named]
stats = [n for n in initial if "running" in n]
print(f"\n{STEPS} steps in {args.dtype}; largest absolute difference from torch.optim:")
print(f"  functrain step:   parameters {max_difference(functional_result, torch_result, params):.1e}, "
      f"BatchNorm statistics {max_difference(functional_result, torch_result, stats):.1e}")  # fmt: skip
print(f"  TorchOptimizer:   parameters {max_difference(adapter_result, torch_result, params):.1e}, "
      f"BatchNorm statistics {max_difference(adapter_result, torch_result, stats):.1e}")  # fmt: skip
