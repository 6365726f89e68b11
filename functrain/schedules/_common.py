"""Argument checks and count handling shared by the schedules."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .. import _validate

_INT64_MAX = 2**63 - 1


# ----------------------------------------------------------------------------- helpers


def _real(owner: str, name: str, value) -> float:
    """The value as a Python float; TypeError for anything but a real number, ValueError for NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}: {value!r}")
    if math.isnan(value):
        raise ValueError(f"{owner}: {name} must not be NaN")
    return float(value)


def _non_negative(owner: str, name: str, value) -> float:
    value = _real(owner, name, value)
    _validate.in_range(owner, name, value, 0.0)
    return value


def _int(owner: str, name: str, value, low: int) -> int:
    """The value as a Python int >= ``low`` that fits the int64 count."""
    return _validate.integer(owner, name, value, low, _INT64_MAX)


def _as_count(count) -> Tensor:
    """The step count as an int64 tensor (a Python int is accepted, on the CPU)."""
    return torch.as_tensor(count).to(torch.int64)


def _full(value: float, like: Tensor) -> Tensor:
    """A float64 tensor of ``value`` on ``like``'s device, for ``torch.where`` branches that are constants."""
    return torch.full((), value, dtype=torch.float64, device=like.device)
