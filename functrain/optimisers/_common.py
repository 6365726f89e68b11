"""Pieces every torch.optim mirror starts and ends with."""

from __future__ import annotations

from typing import Any

from ..base import GradientTransformation
from ..combine import chain
from ..transforms import add_decayed_weights, descend_with_decoupled_decay, scale, scale_by_learning_rate


def nonzero(value: Any) -> bool:
    """False only for a literal zero: a tensor or schedule may take other values later."""
    return not (isinstance(value, (int, float)) and value == 0)


def descent(
    *core: GradientTransformation | None,
    lr: Any,
    maximize: bool = False,
    weight_decay: Any = 0.0,
    decoupled_weight_decay: bool = False,
) -> GradientTransformation:
    """``chain`` of torch.optim's common frame around an optimiser's core direction.

    torch.optim negates the gradient for ``maximize``, then adds ``weight_decay * param`` to it
    (L2, coupled), runs the core, and steps by ``-lr``; decoupled decay (AdamW) instead shrinks the
    parameter by ``lr * weight_decay``, which here is ``weight_decay * param`` added to the core's
    direction before the learning rate scales both. ``None`` entries in ``core`` are skipped.
    """
    decay = add_decayed_weights(weight_decay) if nonzero(weight_decay) else None
    if decoupled_weight_decay and decay is not None and not callable(lr):
        # The same two steps fused into one pass (see descend_with_decoupled_decay).
        tail = [descend_with_decoupled_decay(lr, weight_decay)]
    else:
        tail = [decay if decoupled_weight_decay else None, scale_by_learning_rate(lr)]
    parts = [
        scale(-1.0) if maximize else None,
        None if decoupled_weight_decay else decay,
        *core,
        *tail,
    ]
    return chain(*(p for p in parts if p is not None))
