"""Evaluate the checkpoint written by train.py: accuracy, a confusion matrix, and the matrix as a PNG.

Run with no arguments after ``python examples/mnist/train.py``::

    python examples/mnist/evaluate.py          # reads runs/mnist, writes runs/mnist/confusion_matrix.png

It rebuilds the model and the state's layout from the same code as train.py, loads the latest
checkpoint with ``ft.load_checkpoint`` (which checks every name, shape and dtype, and refuses files
that would run code), puts the trained weights back into an ordinary ``nn.Module``, and evaluates
it on the held-out split of the data train.py used.
"""

import argparse
import json
from pathlib import Path

import torch
from common import CNN, load_data, make_optimiser
from PIL import Image, ImageDraw

import functrain as ft

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", default="runs/mnist", help="the folder train.py wrote")
parser.add_argument("--checkpoint", help="a checkpoint file; default: the latest in OUT/checkpoints")
args = parser.parse_args()

out = Path(args.out)
config_file = out / "config.json"
if not config_file.is_file():
    raise SystemExit(f"No {config_file}: run `python examples/mnist/train.py --out {out}` first")
config = json.loads(config_file.read_text())
path = Path(args.checkpoint) if args.checkpoint else ft.latest_checkpoint(out / "checkpoints")
if path is None:
    raise SystemExit(f"No checkpoint in {out / 'checkpoints'}: run train.py first")

# ----------------------------------------------------------------------------- the trained model
model = CNN()
like = ft.TrainState.create(model, make_optimiser(total_steps=100, lr=1e-3, distributed=False))
state, progress = ft.load_checkpoint(path, like, restore_rng=False)
model.load_state_dict({**state.params, **state.buffers})  # the trained weights in a plain nn.Module
model.eval()
print(f"Loaded {path} (step {int(state.step)}, epoch {progress.get('epoch', '?')})")

# ----------------------------------------------------------------------------- predictions
_, test_set = load_data(config["data"], config["data_dir"])
test_loader = ft.data.make_loader(test_set, batch_size=1000, shuffle=False, drop_last=False)
labels, predictions = [], []
with torch.no_grad():
    for images, y in test_loader:
        labels.append(y)
        predictions.append(model(images).argmax(-1))
labels, predictions = torch.cat(labels), torch.cat(predictions)

classes = 10
confusion = torch.bincount(labels * classes + predictions, minlength=classes * classes).view(classes, classes)
accuracy = confusion.diag().sum().item() / confusion.sum().item()
what = "MNIST test set" if config["data"] == "mnist" else "held-out scikit-learn digits"
print(f"Accuracy {accuracy:.4f} on {len(labels)} images ({what})\n")
print("Confusion matrix (rows: true digit, columns: predicted digit)")
print("      " + "".join(f"{c:>6d}" for c in range(classes)))
for c in range(classes):
    print(f"{c:>6d}" + "".join(f"{n:>6d}" for n in confusion[c].tolist()))


# ----------------------------------------------------------------------------- the PNG
def render(matrix: torch.Tensor, title: str, cell: int = 44) -> Image.Image:
    """A heat map of ``matrix`` with its counts written in the cells (Pillow comes with torchvision)."""
    n = matrix.shape[0]
    margin, top = 34, 44
    image = Image.new("RGB", (margin + n * cell + 8, top + n * cell + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 8), title, fill="black")
    draw.text((margin, 24), "rows: true digit, columns: predicted", fill="gray")
    share = matrix.float() / matrix.sum(1, keepdim=True).clamp(min=1)  # colour by share of the true class
    for i in range(n):
        draw.text((12, top + i * cell + cell // 2 - 6), str(i), fill="black")
        draw.text((margin + i * cell + cell // 2 - 3, top + n * cell + 8), str(i), fill="black")
        for j in range(n):
            shade = int(255 * (1 - share[i, j].item()))
            x, y = margin + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline=(220, 220, 220))
            if matrix[i, j] > 0:
                draw.text((x + 6, y + cell // 2 - 6), str(int(matrix[i, j])), fill="white" if shade < 128 else "black")
    return image


png = out / "confusion_matrix.png"
render(confusion, f"accuracy {accuracy:.4f} on {len(labels)} images").save(png)
print(f"\nWrote {png}")
