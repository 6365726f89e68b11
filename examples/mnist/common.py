"""What train.py and evaluate.py share: the CNN, the loss, the optimiser and the choice of data.

evaluate.py rebuilds the training state from these (same model, same optimiser structure) so that
``ft.load_checkpoint`` can check the file against it key by key and shape by shape.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MEAN, STD = 0.1307, 0.3081  # MNIST's pixel mean and standard deviation (on [0, 1])


class CNN(nn.Module):
    """Two conv blocks and a classifier: about 420k parameters, 99% on MNIST in a couple of epochs."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),  # running statistics live in TrainState.buffers
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14 -> 7
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, num_classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The loader hands over images in [0, 1]; normalising here keeps training and inference alike.
        return self.classifier(self.features((images - MEAN) / STD))


def loss_fn(model: nn.Module, batch):
    images, labels = batch
    logits = model(images)
    return F.cross_entropy(logits, labels), {"acc": (logits.argmax(-1) == labels).float().mean()}


def make_optimiser(total_steps: int, lr: float, distributed: bool) -> ft.GradientTransformation:
    """AdamW with a linear warm-up and cosine decay. The lr is injected (kept in the state, which a
    schedule alone is not), so the loop logs its value as ``lr``.

    In a data-parallel run the first link averages the gradients over the ranks; otherwise it is
    ``identity()``. Both hold an ``EmptyState``, so checkpoints have one layout either way and
    evaluate.py can load what ``torchrun`` wrote.
    """
    schedule = ft.schedules.warmup_cosine(lr, warmup_steps=max(1, total_steps // 20), total_steps=total_steps)
    return ft.chain(
        ft.distributed.sync_gradients() if distributed else ft.identity(),
        ft.inject_hyperparams(ft.adamw, static_args=("betas", "eps", "weight_decay"))(lr=schedule, weight_decay=5e-4),
    )


def mnist_on_disk(data_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(data_dir, "MNIST", "raw", name)) for name in MNIST_FILES)


def load_data(source: str, data_dir: str | None):
    """``(train, test)`` datasets of ``(1x28x28 uint8 image, label)``.

    ``"mnist"``: torchvision's MNIST under ``data_dir`` (60,000 + 10,000 images; downloaded when
    missing and online). ``"digits"``: scikit-learn's 1,797 real handwritten digits (8x8 scans,
    upscaled to 28x28), shipped inside scikit-learn, so it works offline; 20% held out.
    """
    if source == "mnist":
        return ft.data.mnist(data_dir, "train"), ft.data.mnist(data_dir, "test")
    return ft.data.digits("train", size=28), ft.data.digits("test", size=28)
