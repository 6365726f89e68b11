"""Donated state: an eager in-place step consumes its input state, so the optimiser may write into it.

A pure update must leave its inputs as they were, so torch's fused Adam kernel runs on fresh copies of
the moments. In a ``make_train_step(..., inplace=True)`` step the input state is consumed anyway (it
is overwritten with the result), and copying the moments only to copy them back doubles the memory of
the optimiser state at the peak of the step. Inside :func:`donated`, such transforms write into the
state's own tensors instead (as JAX's ``donate_argnums`` lets XLA reuse donated buffers).

Compiled steps never donate: inductor already writes an in-place step's results into the inputs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch

_DONATED = contextvars.ContextVar("functrain_donated", default=False)


@contextlib.contextmanager
def donated(flag: bool = True) -> Iterator[None]:
    """Within the block, transforms may update the optimiser state they are given in place."""
    token = _DONATED.set(flag)
    try:
        yield
    finally:
        _DONATED.reset(token)


def is_donated() -> bool:
    """Whether the state being updated is donated (never while torch.compile traces)."""
    return not torch.compiler.is_compiling() and _DONATED.get()


def keeping_inputs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with its inputs left intact.

    An eager ``make_train_step(..., inplace=True)`` step donates the optimiser state: transforms
    with a fused in-place kernel (Adam's) may then write into the state they are given. A wrapper
    that still reads the inner state after calling the inner update, to keep it on a skipped step
    as ``apply_if_finite`` does, calls the inner update through this function.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adam(lr=0.1)
        >>> params = {"w": torch.tensor([1.0])}
        >>> state = tx.init(params)
        >>> updates, new_state = ft.keeping_inputs(tx.update, {"w": torch.tensor([2.0])}, state, params)
        >>> float(state[0].mu["w"]), float(new_state[0].mu["w"])
        (0.0, 0.2...)
    """
    if not is_donated():
        return fn(*args, **kwargs)
    with donated(False):
        return fn(*args, **kwargs)
