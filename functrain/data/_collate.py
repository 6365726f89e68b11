"""Why a batch cannot be collated, in terms of its samples.

``collate`` (``default_collate``) stacks the samples of a batch, and fails deep inside torch, naming
no sample, when one is None or when they differ in structure or shape. Nothing is checked on the way
of a good batch: only after ``collate`` has failed does :func:`uncollatable` look for the first
sample that is or holds None, or that differs from the batch's first sample, and say what to do.
"""

from __future__ import annotations

import numbers
from typing import Any

from torch import Tensor

_A_SAMPLE = "A sample must be a tensor, a number, a numpy array, a PIL image, or a tuple, list or dict of them"


def uncollatable(
    samples: list[Any], indices: list[int], epoch: int, number: int, none_from: dict[int, str], error: Exception
) -> str:
    """Why ``collate`` failed on this batch, in terms of its samples: the first sample that is or holds
    None, else the first that differs from the batch's first sample in structure or shape, else the
    collate's own error; and what to do."""
    head = f"functrain.data: batch {number} of epoch {epoch} (samples {_brief(indices)}) cannot be collated"
    cause = f"(collate raised {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''})"
    for index, sample in zip(indices, samples):
        path = _none_path(sample)
        if path is not None:
            what = f"sample {index}" + (f"'s {path}" if path else "") + " is None"
            origin = f": {none_from[index]} (a missing return?)" if not path and index in none_from else ""
            return (
                f"{head}: {what}{origin}. {_A_SAMPLE}; to skip bad samples, return None and pass a collate= that "
                f"drops them. {cause}"
            )
    for index, sample in zip(indices[1:], samples[1:]):
        found = _first_difference(samples[0], sample)
        if found is not None:
            path, first, other = found
            where = f"'s {path}" if path else ""
            return (
                f"{head}: sample {indices[0]}{where} {first} but sample {index}{where} {other}. The samples of a "
                "batch must share their structure and shapes (collate stacks them): bring them to one size in "
                "transform (e.g. v2.Resize, v2.CenterCrop), or pass a collate= that pads. " + cause
            )
    return f"{head}: {type(error).__name__}: {error}"


def _brief(indices: list[int]) -> str:
    return str(indices) if len(indices) <= 16 else f"[{', '.join(map(str, indices[:8]))}, ...] ({len(indices)})"


def _children(x: Any) -> list[tuple[Any, Any]]:
    """(key, value) of a tuple, list or dict sample; [] for a leaf."""
    if isinstance(x, tuple | list):
        return list(enumerate(x))
    if isinstance(x, dict):
        return list(x.items())
    return []


def _none_path(x: Any, path: str = "") -> str | None:
    """Where in sample ``x`` the first None is ("" for x itself, "[1]", "['mask']"), or None."""
    if x is None:
        return path
    for key, child in _children(x):
        found = _none_path(child, f"{path}[{key!r}]")
        if found is not None:
            return found
    return None


def _is_array(x: Any) -> bool:
    return isinstance(x, Tensor) or (type(x).__module__ == "numpy" and hasattr(x, "shape"))


def _what(x: Any) -> str:
    if _is_array(x):
        return f"has shape {tuple(x.shape)}"
    if isinstance(x, tuple | list):
        return f"is a {type(x).__name__} of {len(x)} elements"
    if isinstance(x, dict):
        return f"has keys {list(x)}"
    return f"is a {type(x).__name__}"


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, str, str] | None:
    """The first place where samples ``a`` and ``b`` differ in structure or shape, as (path, what a is,
    what b is); numbers of different types (1 and 1.0) and strings do not count."""
    if _is_array(a) and _is_array(b):
        return None if tuple(a.shape) == tuple(b.shape) else (path, _what(a), _what(b))
    if isinstance(a, numbers.Number) and isinstance(b, numbers.Number):
        return None
    mismatch = (path, _what(a), _what(b))
    if type(a) is not type(b):
        return mismatch
    if len(_children(a)) != len(_children(b)) or (isinstance(a, dict) and a.keys() != b.keys()):
        return mismatch
    for key, x in _children(a):
        found = _first_difference(x, b[key], f"{path}[{key!r}]")
        if found is not None:
            return found
    return None
