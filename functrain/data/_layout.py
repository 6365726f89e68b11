"""Sample layout: images from PIL or HWC numpy arrays to CHW tensors, and small tree helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_AS_THEY_ARE = frozenset({Tensor, int, float, bool, str, bytes, type(None)})  # (labels, paths: the common leaves)


def to_chw(sample: Any) -> Any:
    """A sample with its images as CHW tensors: PIL images and HWC (or HW) uint8 numpy arrays become
    CHW uint8 tensors; tuples, lists and dicts are converted element by element; tensors (already
    CHW by torchvision's convention) and everything else pass through.

    Example:
        >>> import numpy as np
        >>> from functrain.data import to_chw
        >>> image, label = to_chw((np.zeros((32, 24, 3), dtype=np.uint8), 7))
        >>> tuple(image.shape), image.dtype, label
        ((3, 32, 24), torch.uint8, 7)
    """
    if type(sample) in _AS_THEY_ARE or isinstance(sample, Tensor):
        return sample
    if type(sample) is tuple and all(type(s) in _AS_THEY_ARE for s in sample):
        return sample  # (an (image tensor, label) pair: the common case, in a few hundred nanoseconds)
    if isinstance(sample, tuple | list):
        return type(sample)(to_chw(s) for s in sample)
    if isinstance(sample, dict):
        return {k: to_chw(v) for k, v in sample.items()}
    if _is_pil(sample):
        from torchvision.transforms.v2.functional import pil_to_tensor  # torchvision: imported on use

        return pil_to_tensor(sample)
    if type(sample).__module__ == "numpy" and getattr(sample, "dtype", None) is not None:
        if sample.dtype.name == "uint8" and sample.ndim == 2:
            return torch.from_numpy(sample).unsqueeze(0)
        if sample.dtype.name == "uint8" and sample.ndim == 3:
            return torch.from_numpy(sample).permute(2, 0, 1)
    return sample


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.")


def _map(fn: Callable, tree: Any) -> Any:
    if isinstance(tree, tuple | list):
        return type(tree)(_map(fn, t) for t in tree)
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _tensors(tree: Any) -> list[Tensor]:
    out: list[Tensor] = []
    _map(lambda t: out.append(t) if isinstance(t, Tensor) else None, tree)
    return out
