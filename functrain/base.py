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
from ._donate import is_donated
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


# The attribute of an ``update`` function holding its fused apply (see `with_fused_apply`).
_FUSED_APPLY = "fused_apply"

FusedApplyFn = Callable[..., Any]  # (updates, state, params) -> (params, state) or None


def with_fused_apply(tx: GradientTransformation, apply: FusedApplyFn) -> GradientTransformation:
    """``tx`` whose update offers ``apply(updates, state, params) -> (new_params, new_state)``: the
    update added to the parameters by one kernel (torch's fused Adam does it in a single pass over
    memory, with no update buffer), or ``None`` where that kernel cannot run.

    A training step uses it through :func:`update_and_apply`. ``apply`` must equal
    ``apply_updates(params, tx.update(updates, state, params)[0])`` up to float rounding, and in a
    donated step (see ``functrain._donate``) it writes into ``params`` and ``state`` themselves.
    The offer lives on the ``update`` function, so the pair stays an ``(init, update)`` NamedTuple;
    any wrapper around ``tx`` builds a new update without it and so takes the general path.
    """
    setattr(tx.update, _FUSED_APPLY, apply)
    return tx


def has_fused_apply(tx: GradientTransformation) -> bool:
    """Whether ``tx``'s update offers a fused apply (see :func:`with_fused_apply`)."""
    return getattr(tx.update, _FUSED_APPLY, None) is not None


def update_and_apply(
    tx: GradientTransformation, updates: Updates, state: OptState, params: Params
) -> tuple[Params, OptState]:
    """One optimiser step: the new parameters and state.

    ``tx``'s fused apply where it offers one and can run, else ``tx.update`` then
    :func:`apply_updates`. In a donated step the parameters are updated where they lie.
    """
    apply = getattr(tx.update, _FUSED_APPLY, None)
    applied = apply(updates, state, params) if apply is not None else None
    if applied is not None:
        return applied
    updates, state = tx.update(updates, state, params)
    return (_tree.add_ if is_donated() else _tree.add)(params, updates), state


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
