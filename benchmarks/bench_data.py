"""Input-pipeline throughput: ``ft.data.make_loader`` against ``torch.utils.data.DataLoader``, side by
side in one run, on the same dataset object, the same per-sample transform object, the same batch
size and the same number of workers.

One round is one full epoch, consumed by a loop that does nothing but touch each batch, so the time
is the pipeline's. ``extra_info["images_per_second"]`` is the epoch's throughput; the ratio
functrain / DataLoader is the time ratio inverted (report.py's ratio column with
``--baseline GROUP=torch-dataloader``).

Entries (the ids report.py reads):

- ``torch-dataloader``: ``DataLoader(dataset_with_transform, batch_size, shuffle=True, drop_last=True,
  num_workers=W, persistent_workers=True)``: worker processes, started once (its fastest setting).
- ``functrain-thread``: ``ft.data.make_loader(dataset, batch_size, transform=T, num_workers=W)``: W
  worker threads (the default), per-sample random streams for reproducible augmentation.
- ``functrain-process``: the same with ``worker_method="process"`` (fork), W worker processes.

Groups (W = 2 workers, this repository's reference machine has 2 cores):

- ``data-digits28``: scikit-learn's digits upscaled to 28x28 (1,797 images x 4 = 7,188 per epoch,
  batch 128), in memory; ``T = ToImage, RandomCrop(28, padding=4), RandomHorizontalFlip,
  ToDtype(float32, scale=True)``: small images, per-sample Python overhead dominates.
- ``data-imagefolder``: an Imagenette-style ImageFolder of 600 generated JPEGs (160 x 160..240, like
  imagenette2-160), decoded by PIL per sample, batch 64; ``T = ToImage, RandomResizedCrop(128),
  RandomHorizontalFlip, ToDtype(float32, scale=True)``: decode and resize dominate.

``--bench-scale smoke`` uses 64 images, batch 16, one round: it checks that every entry runs and
yields float32 batches of the same shape, not its speed.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
from PIL import Image

import functrain as ft

WORKERS = 2
FULL_ROUNDS, FULL_WARMUP = 5, 1
IMPLS = ("torch-dataloader", "functrain-thread", "functrain-process")


class WithTransform(torch.utils.data.Dataset):
    """``transform(dataset[i])``: how a DataLoader user applies a per-sample transform."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.transform(self.dataset[index])


def to_float(*augment) -> v2.Compose:
    return v2.Compose([v2.ToImage(), *augment, v2.ToDtype(torch.float32, scale=True)])


@pytest.fixture(scope="module")
def digits28(bench_config):
    pytest.importorskip("sklearn")
    data = ft.data.digits("all", size=28)
    repeat = 1 if bench_config.smoke else 4
    n = 64 if bench_config.smoke else len(data) * repeat
    images, labels = data.images.repeat(repeat, 1, 1, 1)[:n], data.labels.repeat(repeat)[:n]
    dataset = ft.data.ImageLabelDataset(images.contiguous(), labels.contiguous())
    transform = to_float(v2.RandomCrop(28, padding=4), v2.RandomHorizontalFlip())
    return dataset, transform, 16 if bench_config.smoke else 128


@pytest.fixture(scope="module")
def imagefolder(bench_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenette")
    rng = np.random.default_rng(0)
    per_class = 6 if bench_config.smoke else 60
    for c in range(10):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            w = int(rng.integers(160, 241))
            # Smooth random content (upsampled noise), so JPEG sizes are photo-like rather than noise.
            small = rng.integers(0, 256, (20, w // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, 160), Image.BILINEAR).save(folder / f"{i}.JPEG", quality=90)
    transform = to_float(v2.RandomResizedCrop(128), v2.RandomHorizontalFlip())
    return ft.data.image_folder(root, "train"), transform, 16 if bench_config.smoke else 64


def make(impl: str, dataset, transform, batch_size: int):
    if impl == "torch-dataloader":
        return torch.utils.data.DataLoader(
            WithTransform(dataset, transform),
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=WORKERS,
            persistent_workers=True,
        )
    method = "process" if impl == "functrain-process" else "thread"
    context = "fork" if method == "process" else None
    return ft.data.make_loader(
        dataset, batch_size, transform=transform, num_workers=WORKERS, worker_method=method,
        multiprocessing_context=context,
    )  # fmt: skip


def run_epochs(benchmark, bench_config, impl, dataset, transform, batch_size):
    if impl == "functrain-process" and "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("functrain-process uses the fork start method")
    loader = make(impl, dataset, transform, batch_size)
    shapes = []

    def epoch() -> None:
        count = 0
        for x, _ in loader:
            count += x.shape[0]
            shapes.append((tuple(x.shape), x.dtype))
        assert count == len(loader) * batch_size

    images = len(loader) * batch_size
    times: list[float] = []

    def timed() -> None:
        start = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - start)

    smoke = bench_config.smoke
    benchmark.extra_info.update(
        scale=bench_config.scale.name, workers=WORKERS, batch_size=batch_size, images_per_epoch=images,
        cpu_count=os.cpu_count(),
    )  # fmt: skip
    benchmark.pedantic(
        timed, rounds=1 if smoke else FULL_ROUNDS, warmup_rounds=0 if smoke else FULL_WARMUP, iterations=1
    )
    timed_rounds = times[-(1 if smoke else FULL_ROUNDS) :]
    benchmark.extra_info["images_per_second"] = images / float(np.median(timed_rounds))
    assert shapes and all(s == (shapes[0][0], torch.float32) for s in shapes)
    assert shapes[0][0][0] == batch_size


@pytest.mark.benchmark(group="data-digits28")
@pytest.mark.parametrize("impl", IMPLS)
def test_digits28_epoch(impl, benchmark, bench_config, digits28):
    run_epochs(benchmark, bench_config, impl, *digits28)


@pytest.mark.benchmark(group="data-imagefolder")
@pytest.mark.parametrize("impl", IMPLS)
def test_imagefolder_epoch(impl, benchmark, bench_config, imagefolder):
    run_epochs(benchmark, bench_config, impl, *imagefolder)
