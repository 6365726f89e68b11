"""Lion: the sign of an interpolated momentum (Chen et al., 2023)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree
from ..base import GradientTransformation, Params, register_state, step_count

cast = _tree.scalar_for


@register_state
class ScaleByLionState(NamedTuple):
    count: Tensor  # updates done so far, 0-d int64
    mu: Params  # momentum (EMA of gradients with rate b2)


def scale_by_lion(b1: float | Tensor = 0.9, b2: float | Tensor = 0.99) -> GradientTransformation:
    """Lion's direction: the sign of an interpolation between the momentum and the gradient.

    .. math::
        u_t = \\operatorname{sign}(\\beta_1 m_{t-1} + (1-\\beta_1) g_t), \\qquad
        m_t = \\beta_2 m_{t-1} + (1-\\beta_2) g_t

    The momentum is updated *after* it is used, with its own rate :math:`\\beta_2`; every output
    entry is -1, 0 or 1. As optax's ``scale_by_lion``.
    """

    def init(params):
        return ScaleByLionState(count=step_count(params), mu=_tree.zeros_like(params))

    def update(updates, state, params=None, **extra):
        def one(g: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
            direction = torch.sign(m * cast(b1, m) + g * cast(1 - b1, g))
            return direction, m * cast(b2, m) + g * cast(1 - b2, g)

        out, mu = _tree.map_many(one, updates, state.mu, n=2)
        return out, ScaleByLionState(count=state.count + 1, mu=mu)

    return GradientTransformation(init, update)
