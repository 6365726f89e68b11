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
- ``functrain-default``: ``ft.data.make_loader(dataset, batch_size, transform=T, num_workers=W)``,
  nothing else set: ``worker_method="auto"``, which on Linux is W worker processes started by fork
  (``extra_info["worker_method"]`` records what the loader chose), the global generator reseeded per
  sample for reproducible augmentation.
- ``functrain-thread``: the same with ``worker_method="thread"``: W worker threads, per-sample random
  streams through a thread-local ``TorchFunctionMode``.

Groups (W = 2 workers, this repository's reference machine has 2 cores):

- ``data-digits28``: scikit-learn's digits upscaled to 28x28 (1,797 images x 4 = 7,188 per epoch,
  batch 128), in memory; ``T = ToImage, RandomCrop(28, padding=4), RandomHorizontalFlip,
  ToDtype(float32, scale=True)``: small images, per-sample Python overhead dominates.
- ``data-imagefolder``: an Imagenette-style ImageFolder of 600 generated JPEGs (160 x 160..240, like
  imagenette2-160), decoded by PIL per sample, batch 64; ``T = ToImage, RandomResizedCrop(128),
  RandomHorizontalFlip, ToDtype(float32, scale=True)``: decode and resize dominate.

``--bench-scale smoke`` uses 64 images, batch 16, one round: it checks that every entry runs and
yields float32 batches of the same shape, not its speed.

Run as a script (``python benchmarks/bench_data.py --rounds 7 --json out.json``), it measures the
same entries in paired rounds instead (see :func:`paired`): on a machine shared with other work,
pytest-benchmark's entry-after-entry minutes see different loads, and the ratios swing with them.
"""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
from PIL import Image

import functrain as ft

WORKERS = 2
FULL_ROUNDS, FULL_WARMUP = 5, 1
IMPLS = ("torch-dataloader", "functrain-default", "functrain-thread")


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


def digits28_data(smoke: bool):
    """(dataset, transform, batch size) of ``data-digits28``."""
    data = ft.data.digits("all", size=28)
    repeat = 1 if smoke else 4
    n = 64 if smoke else len(data) * repeat
    images, labels = data.images.repeat(repeat, 1, 1, 1)[:n], data.labels.repeat(repeat)[:n]
    dataset = ft.data.ImageLabelDataset(images.contiguous(), labels.contiguous())
    transform = to_float(v2.RandomCrop(28, padding=4), v2.RandomHorizontalFlip())
    return dataset, transform, 16 if smoke else 128


def imagefolder_data(root: pathlib.Path, smoke: bool):
    """(dataset, transform, batch size) of ``data-imagefolder``, its JPEGs written under ``root``."""
    rng = np.random.default_rng(0)
    per_class = 6 if smoke else 60
    for c in range(10):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            w = int(rng.integers(160, 241))
            # Smooth random content (upsampled noise), so JPEG sizes are photo-like rather than noise.
            small = rng.integers(0, 256, (20, w // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, 160), Image.BILINEAR).save(folder / f"{i}.JPEG", quality=90)
    transform = to_float(v2.RandomResizedCrop(128), v2.RandomHorizontalFlip())
    return ft.data.image_folder(root, "train"), transform, 16 if smoke else 64


@pytest.fixture(scope="module")
def digits28(bench_config):
    pytest.importorskip("sklearn")
    return digits28_data(bench_config.smoke)


@pytest.fixture(scope="module")
def imagefolder(bench_config, tmp_path_factory):
    return imagefolder_data(tmp_path_factory.mktemp("imagenette"), bench_config.smoke)


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
    if impl == "functrain-thread":
        return ft.data.make_loader(
            dataset, batch_size, transform=transform, num_workers=WORKERS, worker_method="thread"
        )
    return ft.data.make_loader(dataset, batch_size, transform=transform, num_workers=WORKERS)


def run_epochs(benchmark, bench_config, impl, dataset, transform, batch_size):
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
    # What loaded the batches (for the default: what worker_method="auto" chose, once running).
    benchmark.extra_info["worker_method"] = "process" if impl == "torch-dataloader" else loader.worker_method
    if isinstance(loader, ft.data.Loader):
        loader.close()  # its workers, a few batches into the next epoch, stop now: not during the next entry
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


# ----------------------------------------------------------------------------- paired rounds (a script)


def paired(rounds: int, epochs: int) -> dict:
    """Each group's entries measured in turns, so that a change of load on a shared machine hits
    every entry alike: each round runs, for each entry in a rotating order, one untimed epoch and
    then ``epochs`` timed ones (functrain's loaders are closed after their turn: their workers, a
    few batches into the next epoch, would otherwise load during the next entry's turn). A round's
    ratio is DataLoader's time over the entry's: above 1 is faster."""
    import tempfile

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        groups = {
            "data-digits28": digits28_data(smoke=False),
            "data-imagefolder": imagefolder_data(pathlib.Path(tmp), smoke=False),
        }
        for group, (dataset, transform, batch_size) in groups.items():
            loaders = {impl: make(impl, dataset, transform, batch_size) for impl in IMPLS}
            times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
            for r in range(rounds):
                for impl in IMPLS[r % len(IMPLS) :] + IMPLS[: r % len(IMPLS)]:
                    loader = loaders[impl]
                    for _ in loader:  # untimed: starts the workers, fills the queues
                        pass
                    start = time.perf_counter()
                    for _ in range(epochs):
                        for _ in loader:
                            pass
                    times[impl].append(time.perf_counter() - start)
                    if isinstance(loader, ft.data.Loader):
                        loader.close()
            base = times["torch-dataloader"]
            results[group] = {
                impl: {
                    "seconds_per_epoch": [t / epochs for t in times[impl]],
                    "ratio": [b / t for b, t in zip(base, times[impl])],
                    "worker_method": "process" if impl == "torch-dataloader" else loaders[impl].worker_method,
                }
                for impl in IMPLS
            }
    return results


if __name__ == "__main__":
    import argparse
    import json
    import statistics

    parser = argparse.ArgumentParser(description=paired.__doc__.split(".")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per entry and round")
    parser.add_argument("--json", help="write the rounds' times and ratios here")
    args = parser.parse_args()
    results = paired(args.rounds, args.epochs)
    for group, entries in results.items():
        for impl, r in entries.items():
            if impl != "torch-dataloader":
                ratio = r["ratio"]
                print(
                    f"{group} {impl} ({r['worker_method']}): {statistics.median(ratio):.2f}x DataLoader's throughput "
                    f"(median of {len(ratio)} rounds; range {min(ratio):.2f}-{max(ratio):.2f})"
                )
    if args.json:
        meta = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
        with open(args.json, "w") as f:
            json.dump({"machine": meta, "rounds": args.rounds, "epochs": args.epochs, "groups": results}, f, indent=1)
