"""Averages of the parameter trajectory, kept beside the optimisation (they do not change the steps)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree
from ..base import GradientTransformation, Params, register_state, require_params, step_count

cast = _tree.scalar_for


@register_state
class PolyakAveragingState(NamedTuple):
    count: Tensor  # updates done so far
    ax: Params  # the running average of the parameters (torch.optim.ASGD's ``state["ax"]``)


def polyak_averaging(t0: float | Tensor = 1e6) -> GradientTransformation:
    """Polyak-Ruppert averaging of the parameters from step ``t0`` on, as torch.optim.ASGD keeps it.

    Passes updates through unchanged; with :math:`\\theta_{k+1}` = ``params + updates`` after the
    update that finds ``count`` = :math:`k`:

    .. math::
        \\mu_k = 1 / \\max(1, k - t_0) \\;(\\mu_0 = 1), \\qquad
        \\bar\\theta_{k+1} = \\bar\\theta_k + \\mu_k (\\theta_{k+1} - \\bar\\theta_k)

    so until step :math:`t_0` the average is just the latest parameters, and after it the mean of
    the parameters since. Place it last in a chain, so that ``updates`` are the final step.
    """

    def init(params):
        return PolyakAveragingState(count=step_count(params), ax=_tree.zeros_like(params))

    def update(updates, state, params=None, **extra):
        require_params("polyak_averaging", params)
        new_params = _tree.add(params, updates)  # exactly what apply_updates will produce
        steps_past_t0 = state.count.to(torch.float64) - t0
        # torch.optim.ASGD computes mu at the end of the previous step and starts it at 1.
        mu = torch.where(state.count == 0, 1.0, 1.0 / torch.clamp(steps_past_t0, min=1.0))
        copy = mu == 1  # torch.optim copies then, rather than computing ax + 1 * (p - ax)
        ax = _tree.map(lambda a, p: torch.where(copy, p, a + (p - a) * cast(mu, a)), state.ax, new_params)
        return updates, PolyakAveragingState(count=state.count + 1, ax=ax)

    return GradientTransformation(init, update)
