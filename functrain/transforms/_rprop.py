"""Resilient backpropagation: per-element step sizes adapted from gradient signs alone."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree
from ..base import GradientTransformation, Params, register_state

cast = _tree.scalar_for


@register_state
class ScaleByRpropState(NamedTuple):
    step_sizes: Params  # per-element step sizes, initialised to the learning rate
    prev_updates: Params  # last step's gradient, zeroed where its sign flipped


def scale_by_rprop(
    learning_rate: float | Tensor = 1e-2,
    etas: tuple[float | Tensor, float | Tensor] = (0.5, 1.2),
    step_sizes: tuple[float | Tensor, float | Tensor] = (1e-6, 50.0),
) -> GradientTransformation:
    """Rprop (Riedmiller & Braun, 1993) as torch.optim.Rprop computes it.

    With :math:`s = \\operatorname{sign}(g_t\\, g_{t-1})` and ``etas`` :math:`= (\\eta^-, \\eta^+)`:

    .. math::
        \\Delta_t = \\operatorname{clamp}(\\Delta_{t-1} \\cdot
            \\{\\eta^+ \\text{ if } s>0;\\ \\eta^- \\text{ if } s<0;\\ 1\\},\\ \\Delta_{\\min}, \\Delta_{\\max}),
        \\quad g_t \\leftarrow 0 \\text{ where } s < 0, \\quad u_t = \\operatorname{sign}(g_t)\\, \\Delta_t

    :math:`\\Delta_0` = ``learning_rate``, which is read only by ``init``. The output is a direction
    like any ``scale_by_*``: follow with ``scale(-1.0)`` to descend.
    """
    eta_minus, eta_plus = etas
    step_min, step_max = step_sizes

    def init(params):
        return ScaleByRpropState(
            step_sizes=_tree.full_like(params, learning_rate), prev_updates=_tree.zeros_like(params)
        )

    def leaf(g, prev, step_size):
        # torch.optim takes the sign of the product (not the product of signs), so a product that
        # underflows to zero counts as "no sign information", as there.
        sign = (g * prev).sign()
        flipped = sign < 0
        factor = torch.where(flipped, cast(eta_minus, g), torch.ones_like(g))
        factor = torch.where(sign > 0, cast(eta_plus, g), factor)
        new_step_size = (step_size * factor).clamp(cast(step_min, g), cast(step_max, g))
        g = torch.where(flipped, torch.zeros_like(g), g)
        return g.sign() * new_step_size, g, new_step_size

    def update(updates, state, params=None, **extra):
        out, prev, sizes = _tree.map_many(leaf, updates, state.prev_updates, state.step_sizes, n=3)
        return out, ScaleByRpropState(step_sizes=sizes, prev_updates=prev)

    return GradientTransformation(init, update)
