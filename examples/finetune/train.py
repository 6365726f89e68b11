"""Fine-tune a torchvision ResNet-18 on an ImageFolder tree: new head, low-LR or frozen backbone via ``partition``.

Run with no arguments (offline: on a small ImageFolder it builds from scikit-learn's digits; about 30
seconds on 2 CPU cores)::

    python examples/finetune/train.py

On Imagenette (https://github.com/fastai/imagenette, e.g. ``imagenette2-160``: ``train/<wnid>/*.JPEG``
and ``val/<wnid>/*.JPEG``) with ImageNet weights::

    python examples/finetune/train.py --data-dir imagenette2-160 --image-size 160 --epochs 5

Pretrained weights: ``--weights FILE`` (a ``resnet18`` state dict, e.g. torchvision's
``resnet18-f37072fd.pth``; its ImageNet head is dropped), or by default torchvision's ImageNet weights
(downloaded once, when online). With neither, the backbone starts from random weights, with a warning.

The optimiser is one ``ft.partition``: the new head trains at ``--lr``, the backbone at
``--lr * --backbone-lr-factor`` (a smaller rate keeps pretrained features), or not at all with
``--freeze-backbone`` (``ft.set_to_zero()``: no optimiser state for it). Writes checkpoints and a
JSONL log to ``--out`` (default ``runs/finetune``). Smoke run: ``--steps 3``.
"""

import argparse
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.transforms import v2

import functrain as ft

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--data-dir", help="an ImageFolder tree with train/ and val/; default: built from the digits")
parser.add_argument("--weights", default="imagenet", help="a resnet18 state-dict FILE, 'imagenet' or 'none'")
parser.add_argument("--out", default="runs/finetune")
parser.add_argument("--image-size", type=int, default=None, help="default: 64 on the digits, 160 otherwise")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--steps", type=int, help="train this many steps instead of --epochs (smoke runs)")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-3, help="the new head's learning rate")
parser.add_argument("--backbone-lr-factor", type=float, help="default: 0.1 with pretrained weights, else 1")
parser.add_argument("--freeze-backbone", action="store_true", help="train the head alone")
parser.add_argument("--compile", action="store_true", help="compile the step (a slow warm-up on CPU)")
parser.add_argument("--workers", type=int, default=2)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
device = ft.default_device()
out = Path(args.out)

# ----------------------------------------------------------------------------- the data
if args.data_dir is None:
    # The default dataset: the digits written out as PNG files in the Imagenette layout, so the code
    # below is exactly what runs on a real ImageFolder tree.
    root = out / "digits-imagefolder"
    if not (root / "complete").exists():
        for split, part in (("train", "train"), ("val", "test")):
            images = ft.data.digits(part, size=64)
            for i in range(len(images)):
                image, label = images[i]
                folder = root / split / f"digit_{label}"
                folder.mkdir(parents=True, exist_ok=True)
                v2.functional.to_pil_image(image).save(folder / f"{i:04d}.png")
        (root / "complete").touch()
    print(f"Data: no --data-dir, so an ImageFolder of scikit-learn's handwritten digits (64x64 PNG) in {root}")
else:
    root = Path(args.data_dir)
    print(f"Data: ImageFolder tree {root}")
size = args.image_size or (64 if args.data_dir is None else 160)

train_tf = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True)]
if args.data_dir is not None:
    train_tf.append(v2.RandomHorizontalFlip())  # photos, yes; digits are not mirror-symmetric
train_set = ft.data.image_folder(root, "train")  # samples: (PIL RGB image, class index)
val_set = ft.data.image_folder(root, "val")
classes = train_set.classes
train_loader = ft.data.make_loader(
    train_set, args.batch_size, transform=v2.Compose(train_tf), seed=args.seed, num_workers=args.workers, device=device
)
val_loader = ft.data.make_loader(
    val_set,
    args.batch_size,
    transform=v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)]),
    shuffle=False,
    drop_last=False,
    num_workers=args.workers,
    device=device,
)
print(f"{len(train_set)} training and {len(val_set)} validation images, {len(classes)} classes, {size}x{size}")

# ----------------------------------------------------------------------------- the model
model = torchvision.models.resnet18()
pretrained = True
if args.weights == "imagenet":
    try:
        weights = torchvision.models.ResNet18_Weights.DEFAULT
        model.load_state_dict(weights.get_state_dict(progress=False))  # cached in ~/.cache/torch/hub
        print("Weights: torchvision's ImageNet ResNet-18")
    except Exception as error:  # offline: URLError, OSError, ...
        pretrained = False
        warnings.warn(
            f"could not fetch torchvision's ResNet-18 weights ({type(error).__name__}: {error}); the backbone starts "
            "from RANDOM weights. Download resnet18-f37072fd.pth and pass --weights FILE to fine-tune for real.",
            stacklevel=1,
        )
elif args.weights == "none":
    pretrained = False
    print("Weights: none (random initialisation)")
else:
    saved = torch.load(args.weights, map_location="cpu", weights_only=True)
    saved = {k: v for k, v in saved.items() if not k.startswith("fc.")}  # the old head is replaced below
    missing, unexpected = model.load_state_dict(saved, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise SystemExit(f"{args.weights} is not a resnet18 state dict: missing {missing}, unexpected {unexpected}")
    print(f"Weights: {args.weights}")
model.fc = nn.Linear(model.fc.in_features, len(classes))  # the new head
model = model.to(device)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)


def loss_fn(model, batch):
    images, labels = batch
    logits = model((images - IMAGENET_MEAN) / IMAGENET_STD)  # the statistics the weights were trained with
    return F.cross_entropy(logits, labels), {"acc": (logits.argmax(-1) == labels).float().mean()}


# ----------------------------------------------------------------------------- optimiser: one partition
epochs = args.epochs
total_steps = args.steps or epochs * len(train_loader)
factor = args.backbone_lr_factor if args.backbone_lr_factor is not None else (0.1 if pretrained else 1.0)
schedule = lambda lr: ft.schedules.cosine_annealing_lr(lr, T_max=total_steps)
tx = ft.partition(
    {
        "head": ft.adamw(lr=schedule(args.lr), weight_decay=1e-4),
        "backbone": ft.set_to_zero() if args.freeze_backbone else ft.adamw(lr=schedule(args.lr * factor)),
    },
    lambda name, p: "head" if name.startswith("fc.") else "backbone",  # labels from parameter names
)
print(
    "Backbone: "
    + ("frozen (set_to_zero)" if args.freeze_backbone else f"trained at {factor:g} x the head's lr ({args.lr:g})")
)
state = ft.TrainState.create(model, tx)
step = ft.make_train_step(model, loss_fn, tx, compile=args.compile)
evaluate = ft.make_eval_step(model, loss_fn)


class PrintEval(ft.Callback):
    def on_eval_end(self, loop):
        print(f"epoch {loop.epoch}  step {loop.step}  val loss {loop.eval_logs['loss']:.4f}  "
              f"val acc {loop.eval_logs['acc']:.4f}")  # fmt: skip


start = time.perf_counter()
state, history = ft.fit(
    step,
    state,
    train_loader,
    **({"steps": args.steps} if args.steps else {"epochs": epochs}),  # whole epochs end with an evaluation
    eval_step=evaluate,
    eval_loader=val_loader,
    callbacks=[ft.callbacks.ProgressBar(), PrintEval(), ft.callbacks.JSONLogger(out / "log.jsonl")],
    checkpoint=ft.callbacks.Checkpoint(out / "checkpoints", keep=1),  # ResNet-18 + AdamW: 130 MB a file
    log_every=10,
    device=device,
)
elapsed = time.perf_counter() - start

# The mean over validation batches weighs the short last batch like a full one: count instead.
correct = total = 0
for images, labels in val_loader:
    correct += int(evaluate(state, (images, labels))["acc"] * len(labels) + 0.5)
    total += len(labels)
print(f"Validation accuracy {correct / total:.4f} ({total} images) after {int(state.step)} steps in {elapsed:.0f}s")
print(f"Checkpoint: {ft.latest_checkpoint(out / 'checkpoints')}")
