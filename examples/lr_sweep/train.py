"""A learning-rate sweep in one run: K models, one per learning rate, trained at once with ``torch.func.vmap``.

Run: ``python examples/lr_sweep/train.py`` (seconds on a CPU; smoke run: ``--steps 3``).

Each model's learning rate is a tensor in its optimiser state (``ft.inject_hyperparams``), so the K
states differ only in values: ``ft.stack_states`` stacks them leaf by leaf, and
``vmap(step, in_dims=(0, None))`` runs the one step function on all K at once, on the same batches.
At the end, the run with the best learning rate is replayed alone with a plain (unbatched) step to
show that vmapping changed nothing but the speed.

Writes ``loss_curves.png`` (the K training-loss curves) and ``results.json`` to ``--out``
(default ``runs/lr_sweep``).
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

import functrain as ft

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--steps", type=int, help="train this many steps instead of --epochs (smoke runs)")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--out", default="runs/lr_sweep")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

train_loader = ft.data.make_loader(ft.data.digits("train"), args.batch_size, seed=args.seed, num_workers=0)
test = ft.data.digits("test")
test_batch = (test.images.float().div(255), test.labels)

model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def loss_fn(model, batch):
    images, labels = batch
    logits = model(images)
    return F.cross_entropy(logits, labels), {"acc": (logits.argmax(-1) == labels).float().mean()}


# ----------------------------------------------------------------------------- K states, one step
tx = ft.inject_hyperparams(ft.adam)(lr=1e-3)  # lr lives in the state as a 0-d tensor
initial = ft.TrainState.create(model, tx)  # every run starts from the same weights
states = ft.stack_states([ft.set_hyperparams(initial, lr=lr) for lr in args.lrs])
step = ft.make_train_step(model, loss_fn, tx)
sweep_step = torch.func.vmap(step, in_dims=(0, None))  # states batched along dim 0; the batch shared
sweep_eval = torch.func.vmap(ft.make_eval_step(model, loss_fn), in_dims=(0, None))

total_steps = args.steps or args.epochs * len(train_loader)
losses, batches = [], []  # per step: a (K,) tensor of losses; the batches, for the replay below
start = time.perf_counter()
while len(losses) < total_steps:
    for batch in train_loader:
        states, metrics = sweep_step(states, batch)
        losses.append(metrics["loss"])  # stays on the device: read back once, at the end
        batches.append(batch)
        if len(losses) == total_steps:
            break
elapsed = time.perf_counter() - start
curves = torch.stack(losses).T  # (K, steps)
accuracy = sweep_eval(states, test_batch)["acc"]

print(f"Trained {len(args.lrs)} models for {total_steps} steps at once in {elapsed:.1f}s (vmap over stacked states)")
print("      lr   final train loss   held-out acc")
for lr, curve, acc in zip(args.lrs, curves, accuracy.tolist()):
    print(f"{lr:8.0e}   {curve[-min(10, len(curve)) :].mean():16.4f}   {acc:12.4f}")
best = int(torch.nan_to_num(accuracy, nan=-1.0).argmax())
print(f"Best learning rate: {args.lrs[best]:g} (held-out accuracy {accuracy[best]:.4f})")

# ----------------------------------------------------------------------------- the same run, alone
alone = ft.set_hyperparams(initial, lr=args.lrs[best])
for batch in batches:
    alone, _ = step(alone, batch)
swept = ft.unstack_states(states)[best]
diff = max((swept.params[k] - alone.params[k]).abs().max().item() for k in alone.params)
print(f"Replayed alone with lr={args.lrs[best]:g}: largest parameter difference from its vmapped twin {diff:.1e}")


# ----------------------------------------------------------------------------- the plot
def plot(curves: torch.Tensor, labels: list[str], width: int = 720, height: int = 420) -> Image.Image:
    """Smoothed loss curves on a log scale, drawn with Pillow (it comes with torchvision)."""
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
    smooth = curves.clone()
    for t in range(1, curves.shape[1]):  # exponential moving average, so the curves read clearly
        smooth[:, t] = 0.9 * smooth[:, t - 1] + 0.1 * curves[:, t]
    finite = smooth[torch.isfinite(smooth)].clamp(min=1e-4)
    low, high = math.log10(finite.min().item()), math.log10(finite.max().item())
    high = max(high, low + 1e-3)
    left, right, top, bottom = 60, width - 150, 30, height - 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), "training loss (smoothed, log scale) per learning rate", fill="black")
    for i in range(5):  # y ticks
        value = low + (high - low) * i / 4
        y = bottom - (bottom - top) * i / 4
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{10**value:.3g}", fill="black")
    steps = smooth.shape[1]
    draw.text((left, bottom + 10), "step 0", fill="black")
    draw.text((right - 50, bottom + 10), f"step {steps}", fill="black")
    for k, (curve, label) in enumerate(zip(smooth, labels)):
        colour = colours[k % len(colours)]
        points = [
            (
                left + (right - left) * t / max(steps - 1, 1),
                bottom - (bottom - top) * (math.log10(v) - low) / (high - low),
            )
            for t, v in enumerate(curve.clamp(min=1e-4).tolist())
            if math.isfinite(v)
        ]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.line([right + 15, top + 20 * k + 7, right + 40, top + 20 * k + 7], fill=colour, width=3)
        draw.text((right + 46, top + 20 * k), label, fill="black")
    return image


plot(curves, [f"lr {lr:g}" for lr in args.lrs]).save(out / "loss_curves.png")
results = [
    {"lr": lr, "final_loss": curve[-1].item(), "test_acc": acc}
    for lr, curve, acc in zip(args.lrs, curves, accuracy.tolist())
]
(out / "results.json").write_text(json.dumps({"runs": results, "vmap_vs_alone_max_diff": diff}, indent=2))
print(f"Wrote {out / 'loss_curves.png'} and {out / 'results.json'}")
