"""Combinators: build one transformation out of several."""

from __future__ import annotations

from .base import GradientTransformation


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
