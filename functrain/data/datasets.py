"""Real datasets through their real loading code, as map-style datasets of ``(image, label)``.

- :func:`digits`: scikit-learn's bundled 1,797 handwritten digits (8x8, or upscaled), offline; the
  embedded default for examples and tests. Needs the optional extra ``functrain[digits]``.
- :func:`mnist`: ``torchvision.datasets.MNIST`` from a local folder (IDX files under
  ``root/MNIST/raw``), downloaded when missing and a network is there.
- :func:`image_folder`: ``torchvision.datasets.ImageFolder`` over one split of an Imagenette-style
  tree: ``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*.JPEG``.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate


class ImageLabelDataset(torch.utils.data.Dataset):
    """In-memory images and labels: ``dataset[i]`` is ``(images[i], int(labels[i]))``, a CHW uint8 tensor
    and an int.

    Args:
        images: ``(N, C, H, W)`` uint8 tensor.
        labels: ``(N,)`` integer tensor.
        classes: the class names, ``classes[label]``.

    Example:
        >>> import torch
        >>> from functrain.data import ImageLabelDataset
        >>> data = ImageLabelDataset(torch.zeros(5, 1, 8, 8, dtype=torch.uint8), torch.arange(5))
        >>> len(data), data[3][0].shape, data[3][1]
        (5, torch.Size([1, 8, 8]), 3)
    """

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str] | None = None):
        if not (isinstance(images, Tensor) and images.dtype == torch.uint8 and images.ndim == 4):
            raise ValueError("ImageLabelDataset: images must be an (N, C, H, W) uint8 tensor")
        if not (isinstance(labels, Tensor) and labels.shape == images.shape[:1]):
            raise ValueError(f"ImageLabelDataset: labels must be a tensor of shape ({images.shape[0]},)")
        self.images, self.labels = images, labels
        self.classes = classes if classes is not None else [str(c) for c in range(int(labels.max()) + 1)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "functrain.data.digits needs scikit-learn, an optional dependency: "
            "pip install 'functrain[digits]' (or pip install scikit-learn)"
        ) from error
    bunch = load_digits()  # 1797 8x8 images with values 0..16, shipped inside scikit-learn
    images = torch.as_tensor(bunch.images, dtype=torch.float64)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


def digits(split: str = "train", *, size: int = 8, test_fraction: float = 0.2, split_seed: int = 0):
    """scikit-learn's handwritten digits (UCI optdigits test set: 1,797 images of 10 classes) as
    uint8 ``(1, size, size)`` images and int labels; works offline.

    The split is a fixed permutation (``split_seed``): the first ``round(1797 * test_fraction)``
    shuffled indices are ``"test"``, the rest ``"train"`` (each kept in the original order);
    ``"all"`` is every image. Pixel values 0..16 become 0..255; ``size > 8`` upscales bilinearly
    (28 gives MNIST's size).

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        size: side of the returned images, >= 8.
        test_fraction: share of the images in ``"test"``, in (0, 1).
        split_seed: seeds the train/test permutation.

    Returns:
        An :class:`ImageLabelDataset`.

    Raises:
        ImportError: scikit-learn is not installed (``pip install 'functrain[digits]'``).

    Example:
        >>> import functrain as ft
        >>> train, test = ft.data.digits("train"), ft.data.digits("test")
        >>> len(train), len(test), train[0][0].shape, train[0][0].dtype
        (1438, 359, torch.Size([1, 8, 8]), torch.uint8)
    """
    owner = "digits"
    _validate.one_of(owner, "split", split, ("train", "test", "all"))
    size = _validate.integer(owner, "size", size, 8)
    _validate.in_range(owner, "test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
    split_seed = _validate.integer(owner, "split_seed", split_seed, 0)
    images, labels = _load_digits()
    if split != "all":
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
        n_test = round(len(labels) * test_fraction)
        chosen = order[:n_test] if split == "test" else order[n_test:]
        chosen, _ = torch.sort(chosen)
        images, labels = images[chosen], labels[chosen]
    images = images.unsqueeze(1) * (255.0 / 16.0)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8)
    return ImageLabelDataset(images, labels.clone())


def _mnist_files_present(raw_folder: str) -> bool:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return all(os.path.isfile(os.path.join(raw_folder, name)) for name in names)


def mnist(root: str | os.PathLike, split: str = "train", *, download: bool | None = None, **kwargs):
    """``torchvision.datasets.MNIST`` read from ``root/MNIST/raw`` (the four uncompressed IDX files
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``); samples are ``(PIL image, int)``, which :func:`make_loader` turns
    into CHW tensors.

    Args:
        root: the folder holding ``MNIST/``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        download: ``None`` (default) downloads only when the files are missing, ``False`` never.
        **kwargs: passed on to ``torchvision.datasets.MNIST`` (``transform``, ...).

    Raises:
        FileNotFoundError: the files are missing and could not be downloaded (no network?), naming
            the folder and files expected.
    """
    owner = "mnist"
    _validate.one_of(owner, "split", split, ("train", "test"))
    from torchvision.datasets import MNIST

    raw = os.path.join(os.fspath(root), "MNIST", "raw")
    fetch = not _mnist_files_present(raw) if download is None else bool(download)
    try:
        return MNIST(os.fspath(root), train=split == "train", download=fetch, **kwargs)
    except RuntimeError as error:  # torchvision: "Dataset not found" or "Error downloading ..."
        why = f"downloading failed ({str(error).splitlines()[0]})" if fetch else "download=False"
        raise FileNotFoundError(
            f"mnist: the MNIST IDX files are not in {raw} (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) and {why}; put them there, or run once "
            "with a network"
        ) from error


def image_folder(root: str | os.PathLike, split: str = "train", **kwargs):
    """``torchvision.datasets.ImageFolder`` over ``root/split`` of an Imagenette-style tree
    (``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*.JPEG``: one folder per class, classes sorted
    by folder name); samples are ``(PIL RGB image, class index)``.

    Args:
        root: the dataset's folder (e.g. the extracted ``imagenette2-160``).
        split: the subfolder to read (``"train"``, ``"val"``, ...).
        **kwargs: passed on to ``ImageFolder`` (``transform``, ``loader``, ``is_valid_file``, ...).

    Raises:
        FileNotFoundError: ``root/split`` is not a folder.
    """
    from torchvision.datasets import ImageFolder

    folder = os.path.join(os.fspath(root), split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"image_folder: {folder} is not a folder; expected an Imagenette-style tree "
            f"{os.fspath(root)}/{split}/<class>/<image files>"
        )
    return ImageFolder(folder, **kwargs)
