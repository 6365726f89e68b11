"""Data pipelines on ``torchdata.nodes``: seeded, sharded, augmenting and resumable mid-epoch.

``make_loader(dataset, batch_size, ...)`` turns any map-style dataset into a :class:`Loader`:
``for batch in loader`` is one epoch, ``len(loader)`` its number of batches, and
``state_dict()`` / ``load_state_dict()`` resume it exactly, augmentation included. Datasets with
their real loading code: :func:`digits` (scikit-learn's bundled handwritten digits, offline),
:func:`mnist` (torchvision's MNIST from a local folder) and :func:`image_folder` (an Imagenette-style
``train/<class>/*.JPEG`` tree).
"""

from ._layout import to_chw as to_chw
from .datasets import (
    ImageLabelDataset as ImageLabelDataset,
    digits as digits,
    image_folder as image_folder,
    mnist as mnist,
)
from .pipeline import (
    Loader as Loader,
    LoaderTimeout as LoaderTimeout,
    SampleError as SampleError,
    WorkerError as WorkerError,
    make_loader as make_loader,
)

__all__ = [
    "ImageLabelDataset",
    "Loader",
    "LoaderTimeout",
    "SampleError",
    "WorkerError",
    "digits",
    "image_folder",
    "make_loader",
    "mnist",
    "to_chw",
]
