"""Combinators: build one transformation out of several."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor

from . import _tree
from .base import EmptyState, GradientTransformation, OptState, register_state


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` in order; the state is the tuple of their states.

    ``chain(scale_by_adam(), add_decayed_weights(1e-2), scale_by_learning_rate(1e-3))`` is AdamW.
    """
    for i, tx in enumerate(transforms):
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"chain: argument {i} must be a GradientTransformation, got {type(tx).__name__}")

    def init(params):
        return tuple(tx.init(params) for tx in transforms)

    def update(updates, state, params=None, **extra):
        if len(state) != len(transforms):
            raise ValueError(f"chain: state holds {len(state)} entries for {len(transforms)} transforms")
        new_state = []
        for tx, tx_state in zip(transforms, state):
            updates, tx_state = tx.update(updates, tx_state, params, **extra)
            new_state.append(tx_state)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


@register_state
class PartitionState(NamedTuple):
    inner_states: dict[Hashable, OptState]  # label -> the state of that label's transform


Labels = Union[Any, Callable[[str, Tensor], Hashable]]  # noqa: UP007


def partition(transforms: dict[Hashable, GradientTransformation], labels: Labels) -> GradientTransformation:
    """Routes each parameter to the transform of its label: per-group settings in one optimiser.

    ``labels`` is a pytree of labels with the structure of the params, or a function
    ``(name, tensor) -> label`` where ``name`` is the dotted key (``"encoder.0.weight"``). Each
    transform sees only its own parameters, as a ``{name: tensor}`` dict, so its state holds
    nothing for the others (a frozen group under :func:`set_to_zero` holds no state at all).

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(2, 2), "bias": torch.ones(2)}
        >>> tx = ft.partition({"decay": ft.adamw(lr=0.1), "no_decay": ft.adam(lr=0.1)},
        ...                   lambda name, p: "decay" if p.ndim >= 2 else "no_decay")
        >>> sorted(tx.init(params).inner_states)
        ['decay', 'no_decay']
    """
    for label, tx in transforms.items():
        if not isinstance(tx, GradientTransformation):
            raise TypeError(
                f"partition: transforms[{label!r}] must be a GradientTransformation, got {type(tx).__name__}"
            )

    def label_of_each(params) -> list[tuple[str, Hashable]]:
        named = _tree.named_leaves(params)
        if callable(labels):
            assigned = [(name, labels(name, leaf)) for name, leaf in named]
        else:
            _tree.check_same_structure(params, labels, "params", "labels")
            assigned = [(name, label) for (name, _), label in zip(named, _tree.leaves(labels))]
        unknown = sorted({repr(label) for _, label in assigned if label not in transforms})
        if unknown:
            first = next(name for name, label in assigned if repr(label) in unknown)
            raise ValueError(
                f"partition: labels {', '.join(unknown)} have no transform (first: parameter "
                f"'{first}'); transforms are given for {sorted(map(repr, transforms))}"
            )
        return assigned

    def split(tree, assigned) -> dict[Hashable, dict[str, Any]]:
        groups: dict[Hashable, dict[str, Any]] = {label: {} for label in transforms}
        for (name, label), leaf in zip(assigned, _tree.leaves(tree)):
            groups[label][name] = leaf
        return groups

    def init(params):
        assigned = label_of_each(params)
        used = {label for _, label in assigned}
        unused = [label for label in transforms if label not in used]
        if unused and assigned:
            raise ValueError(f"partition: transforms {unused} have no parameters labelled for them")
        groups = split(params, assigned)
        return PartitionState({label: tx.init(groups[label]) for label, tx in transforms.items()})

    def update(updates, state, params=None, **extra):
        assigned = label_of_each(updates if params is None else params)
        grouped_updates = split(updates, assigned)
        grouped_params = split(params, assigned) if params is not None else dict.fromkeys(transforms)
        new_states, new_updates = {}, {}
        for label, tx in transforms.items():
            new_updates[label], new_states[label] = tx.update(
                grouped_updates[label], state.inner_states[label], grouped_params[label], **extra
            )
        flat = [new_updates[label][name] for name, label in assigned]
        return _tree.unflatten(flat, _tree.structure(updates)), PartitionState(new_states)

    return GradientTransformation(init, update)


def set_to_zero() -> GradientTransformation:
    """Zero updates and no state: the transform of a frozen parameter group.

    ``partition({"train": ft.adamw(), "frozen": ft.set_to_zero()}, labels)`` trains only the
    first group, and holds no optimiser state for the second.
    """

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra):
        return _tree.map(torch.zeros_like, updates), state

    return GradientTransformation(init, update)
