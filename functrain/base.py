"""Core types: a gradient transformation is a pair of pure functions over pytrees of tensors.

``init(params) -> state`` builds every tensor the transformation will ever need;
``update(updates, state, params=None, **extra) -> (updates, state)`` maps incoming updates
(gradients, for the first transformation of a chain) to outgoing ones and returns a new state.
Neither function mutates its inputs. Updates are *added* to parameters by :func:`apply_updates`,
so a descent step carries its own minus sign (see ``scale_by_learning_rate``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeVar, Union

import torch
from torch import Tensor

from . import _tree
from ._hoist import hoist

Params = Any
"""A pytree of tensors: ``dict[str, Tensor]`` from ``model.named_parameters()``, or any nesting."""
Updates = Any
"""A pytree of tensors with the structure of the params (gradients, or steps to add)."""
OptState = Any
"""A pytree (usually a NamedTuple) of tensors: everything an optimiser carries between steps."""
Schedule = Callable[[Tensor], Tensor]
"""Maps the 0-d int64 step count (updates done so far) to a 0-d tensor value."""
Hyperparameter = Union[float, Tensor, Schedule]  # noqa: UP007 - a runtime alias, py3.10-safe
"""A python number, a 0-d tensor, or a :data:`Schedule` of the step count."""


class TransformInitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure optimiser building block: ``init(params) -> state`` and
    ``update(updates, state, params=None, **extra) -> (updates, state)``.

    ``extra`` carries keyword arguments that some transforms read (e.g. ``value=loss`` for
    ``reduce_on_plateau``); every transform accepts and ignores the ones it does not use.
    """

    init: TransformInitFn
    update: TransformUpdateFn


_S = TypeVar("_S", bound=type)


def register_state(cls: _S) -> _S:
    """Class decorator for a transform's state NamedTuple.

    Lets ``torch.load(..., weights_only=True)`` rebuild the class: the safe unpickler refuses
    classes it has not been told about, and a NamedTuple of tensors runs no code when rebuilt.
    """
    torch.serialization.add_safe_globals([cls])
    return cls


@register_state
class EmptyState(NamedTuple):
    """State of a transformation that carries nothing between steps."""


def empty_init(params: Params) -> EmptyState:
    """The ``init`` of a transformation that carries nothing between steps."""
    del params
    return EmptyState()


def require_params(owner: str, params: Params | None) -> None:
    """Raises the error a transformation that reads the parameters gives when ``update`` got none."""
    if params is None:
        raise ValueError(f"{owner} needs params: call update(updates, state, params)")


def identity() -> GradientTransformation:
    """The transformation that returns its updates unchanged and holds no state."""

    def update(updates, state, params=None, **extra):
        del params, extra
        return updates, state

    return GradientTransformation(empty_init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    """Returns ``params + updates`` leaf by leaf, as new tensors in each parameter's dtype.

    The inputs are left untouched. ``updates`` must have the same tree structure as ``params``.
    """
    _tree.check_same_structure(params, updates, "params", "updates")
    return _tree.add(params, updates)


def value_at(hyperparameter: Hyperparameter, count: Tensor) -> float | Tensor:
    """The value of a hyperparameter at step ``count``: calls schedules, passes values through."""
    return hoist(hyperparameter(count)) if callable(hyperparameter) else hyperparameter


def step_count(params: Params) -> Tensor:
    """A fresh 0-d int64 step counter on the device of the first parameter (CPU when empty).

    Kept on the parameters' device so a compiled (or CUDA-graphed) step never reads a host value.
    """
    leaves = _tree.leaves(params)
    device = leaves[0].device if leaves else torch.device("cpu")
    return torch.zeros((), dtype=torch.int64, device=device)
