"""Hyperparameter checks made once, in the factory, with messages that say what is allowed.

Schedules cannot be checked before they run, so they pass; floats and 0-d tensors are checked
(a CPU tensor is read here; see `_readable`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import Tensor

from . import _tree


def _readable(value: Tensor) -> bool:
    """Whether reading a tensor's value here is free: on the CPU, in eager mode, outside vmap/grad.

    Wrappers such as ``inject_hyperparams`` rebuild a transformation every step from tensors; a
    read there would synchronise a GPU, or break a compiled graph, so those values pass unchecked
    (their initial values were checked when the wrapper was built).
    """
    return value.device.type == "cpu" and not _tree.tracing()


def _checked_already() -> bool:
    """Whether a factory runs again inside a traced update (``inject_hyperparams`` rebuilds the
    transform there), its arguments checked when it was first built. A host-side check there could
    even break the graph: dynamo turns a Python number that differs between two compiles of the same
    code into a symbolic one, and every training step shares its code."""
    return _tree.tracing()


def _number(value: Any) -> float | None:
    """The value as a float, or None when there is nothing to check now (a schedule, an unreadable tensor)."""
    if callable(value):
        return None
    if isinstance(value, Tensor):
        if not _readable(value):
            return None
        if value.ndim != 0:
            # A (1,)-shaped value would broadcast every 0-d state it meets into shape (1,), and a
            # compiled step would then see a state whose shapes changed: refuse it here, by name.
            raise ValueError(
                f"a tensor hyperparameter must be 0-d (torch.tensor(x), not torch.tensor([x])), "
                f"got shape {tuple(value.shape)}"
            )
        if value.is_complex():
            raise TypeError(f"a tensor hyperparameter must be real, got dtype {value.dtype}")
        return float(value.detach().cpu().item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a float, a 0-d tensor or a schedule, got {type(value).__name__}: {value!r}")
    return float(value)


def in_range(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises ``ValueError("<owner>: <name> must be in [low, high), got <value>")`` when outside.

    ``low``/``high`` of None mean unbounded; ``*_open`` excludes the bound itself. Nothing is
    checked while tracing (see :func:`_checked_already`).
    """
    if _checked_already():
        return
    try:
        x = _number(value)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{owner}: {name}: {error}") from None
    if x is None:
        return
    too_low = low is not None and (x <= low if low_open else x < low)
    too_high = high is not None and (x >= high if high_open else x > high)
    if math.isnan(x) or too_low or too_high:
        raise ValueError(f"{owner}: {name} must be {_describe(low, high, low_open, high_open)}, got {value!r}")


def _describe(low, high, low_open, high_open) -> str:
    if low is None and high is None:
        return "a number (not NaN)"
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def not_a_schedule(owner: str, name: str, value: Any) -> None:
    """TypeError for a schedule passed where only a float or a 0-d tensor works (a transform with no
    step count of its own), saying how to schedule it instead."""
    if callable(value):
        raise TypeError(
            f"{owner}: {name} must be a float or a 0-d tensor, got a schedule ({type(value).__name__}); to change "
            f"it over training, wrap the factory: ft.inject_hyperparams(ft.{owner})(..., {name}=schedule)"
        )


def integer(owner: str, name: str, value: Any, low: int, high: int | None = None) -> int:
    """Returns ``value`` as an int in ``[low, high]``: TypeError for anything but an int (a bool
    included), ValueError naming the allowed range otherwise."""
    if _checked_already():
        return value
    allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be {allowed}, got {type(value).__name__}: {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")
    return int(value)


def boolean(owner: str, name: str, value: Any) -> bool:
    """Returns ``value``, a bool; TypeError naming the argument for anything else (0 and 1 included)."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__}: {value!r}")
    return value


def seconds(owner: str, name: str, value: Any) -> float | None:
    """Returns a timeout ``value`` as a float number of seconds, finite and > 0, or ``None`` (wait
    forever): TypeError for anything but a real number (a bool included) or None, ValueError otherwise."""
    allowed = "a number of seconds > 0, or None to wait forever"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be {allowed}, got {type(value).__name__}: {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")
    return float(value)


def one_of(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}: {name} must be one of {allowed}, got {value!r}")


def pair(owner: str, name: str, value: Any) -> tuple[Any, Any]:
    """Unpacks a 2-tuple hyperparameter such as ``betas``, naming it when it is not one."""
    try:
        first, second = value
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a pair of values, got {value!r}") from None
    return first, second
