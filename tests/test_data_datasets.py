"""ft.data's datasets through their real loading code: MNIST IDX files read by torchvision, an
Imagenette-style ImageFolder tree of PNG and JPEG files, and scikit-learn's bundled digits, each
compared with the pixels and labels that were written or that scikit-learn returns."""

from __future__ import annotations

import struct
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
from PIL import Image

import functrain as ft
from functrain.data import datasets as ft_datasets

# ----------------------------------------------------------------------------- MNIST


def write_idx(path, array: np.ndarray) -> None:
    """The IDX format of MNIST's files: magic (0, 0, dtype code 0x08 = uint8, ndim), then each
    dimension as a big-endian int32, then the data."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_root(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train": (rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)),
        "t10k": (rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)),
    }
    for prefix, (x, y) in arrays.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return tmp_path, arrays


def test_mnist_reads_the_idx_files_through_torchvision(mnist_root):
    root, arrays = mnist_root
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = ft.data.mnist(root, split)  # files present: no download attempted
        x, y = arrays[prefix]
        assert len(data) == len(y)
        image, label = data[3]
        assert np.array_equal(np.asarray(image), x[3]) and label == y[3]
    loader = ft.data.make_loader(ft.data.mnist(root, "train"), 4, transform=v2.RandomCrop(28, padding=2))
    images, labels = next(iter(loader))
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.float32 and labels.dtype == torch.int64


def test_mnist_missing_files_say_where_they_were_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        ft.data.mnist(tmp_path, download=False)
    with pytest.raises(ValueError, match="split"):
        ft.data.mnist(tmp_path, "validation")


# ----------------------------------------------------------------------------- ImageFolder (Imagenette layout)


@pytest.fixture
def imagenette_root(tmp_path):
    """train/<wnid>/*.{JPEG,png} and val/<wnid>/*.png, like imagenette2-160 (three classes here)."""
    rng = np.random.default_rng(1)
    written = {}
    for split, count in (("train", 3), ("val", 1)):
        for wnid in ("n01440764", "n02102040", "n02979186"):
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                name = f"{wnid}_{i}.png" if i % 2 == 0 else f"{wnid}_{i}.JPEG"
                Image.fromarray(pixels).save(folder / name)
                written[(split, wnid, name)] = pixels
    return tmp_path, written


def test_image_folder_reads_an_imagenette_tree(imagenette_root):
    root, written = imagenette_root
    train = ft.data.image_folder(root, "train")
    assert train.classes == ["n01440764", "n02102040", "n02979186"] and len(train) == 9
    for path, label in train.samples:
        wnid, name = path.split("/")[-2:]
        image, got_label = train[train.samples.index((path, label))]
        assert got_label == train.classes.index(wnid)
        if name.endswith(".png"):  # lossless: the pixels written come back
            assert np.array_equal(np.asarray(image), written[("train", wnid, name)])
    assert len(ft.data.image_folder(root, "val")) == 3
    loader = ft.data.make_loader(train, 3, transform=v2.RandomResizedCrop(16), channels_last=True)
    for x, _ in loader:
        assert x.shape == (3, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_image_folder_missing_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="Imagenette-style"):
        ft.data.image_folder(tmp_path, "train")


# ----------------------------------------------------------------------------- scikit-learn digits


def test_digits_are_scikit_learns_images_split_deterministically():
    from sklearn.datasets import load_digits

    reference = load_digits()
    everything = ft.data.digits("all")
    assert len(everything) == len(reference.target) == 1797
    expected = np.rint(reference.images * (255 / 16)).astype(np.uint8)
    assert np.array_equal(everything.images[:, 0].numpy(), expected)
    assert np.array_equal(everything.labels.numpy(), reference.target)

    train, test = ft.data.digits("train"), ft.data.digits("test")
    assert len(test) == round(1797 * 0.2) and len(train) + len(test) == 1797
    weights = torch.randint(1, 2**20, (65,))  # one integer key per (image, label) row: exact, order-free
    keys = lambda d: (torch.cat([d.images.flatten(1), d.labels[:, None]], 1).long() * weights).sum(1)
    together = torch.sort(torch.cat([keys(train), keys(test)])).values
    assert torch.equal(together, torch.sort(keys(everything)).values)  # every image once, with its label
    assert torch.equal(ft.data.digits("train").images, train.images)  # deterministic
    assert not torch.equal(ft.data.digits("train", split_seed=1).images, train.images)
    assert set(test.labels.tolist()) == set(range(10))


def test_digits_upscaled_to_mnist_size():
    from sklearn.datasets import load_digits

    train = ft.data.digits("train", size=28)
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and isinstance(label, int)
    assert torch.equal(train.labels, ft.data.digits("train").labels)
    # Reference: PIL's bilinear resize of the same 8x8 images (as float "F" images), within rounding.
    scaled = load_digits().images[:40] * (255 / 16)
    resize = lambda a: np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((28, 28), Image.BILINEAR))
    reference = np.rint(np.clip(np.stack([resize(a) for a in scaled]), 0, 255))
    assert np.abs(ft.data.digits("all", size=28).images[:40, 0].numpy() - reference).max() <= 1


def test_digits_through_the_loader_train_a_classifier():
    train, test = ft.data.digits("train"), ft.data.digits("test")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    loss = lambda m, batch: torch.nn.functional.cross_entropy(m(batch[0]), batch[1])
    tx = ft.adam(lr=1e-1)
    state, step = ft.TrainState.create(model, tx), ft.make_train_step(model, loss, tx)
    loader = ft.data.make_loader(train, 128, seed=0, num_workers=0)
    for _ in range(2):
        for batch in loader:
            state, _ = step(state, batch)
    x = test.images.float() / 255
    accuracy = (torch.func.functional_call(model, state.params, (x,)).argmax(-1) == test.labels).float().mean()
    assert accuracy > 0.85


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if not installed
    ft_datasets._load_digits.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"functrain\[digits\]"):
            ft.data.digits()
    finally:
        ft_datasets._load_digits.cache_clear()


def test_digits_arguments_are_checked():
    with pytest.raises(ValueError, match="split"):
        ft.data.digits("validation")
    with pytest.raises(ValueError, match="size"):
        ft.data.digits(size=4)
    with pytest.raises(ValueError, match="test_fraction"):
        ft.data.digits(test_fraction=1.0)
