"""ADOPT: Adam with the current gradient normalised by the previous second moment (Taniguchi et al., 2024)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree
from .._hoist import hoist
from ..base import GradientTransformation, Params, register_state, step_count
from ._adam import _ema, _ema_of_squares

cast = _tree.scalar_for


@register_state
class ScaleByAdoptState(NamedTuple):
    count: Tensor  # updates done so far, 0-d int64 (the first one only initialises nu)
    mu: Params  # EMA of the clipped, normalised gradients
    nu: Params  # second moment (EMA of squared gradients), one step behind the gradient it divides


def scale_by_adopt(
    b1: float | Tensor = 0.9,
    b2: float | Tensor = 0.9999,
    eps: float | Tensor = 1e-6,
    clip_exp: float | Tensor | None = 0.25,
) -> GradientTransformation:
    """ADOPT's direction (Taniguchi et al., 2024, Algorithm 2 with the clipping of the official code).

    .. math::
        v_0 = g_0^2, \\qquad
        m_t = \\beta_1 m_{t-1} + (1-\\beta_1)\\,
              \\mathrm{clip}\\!\\Big(\\frac{g_t}{\\max(\\sqrt{v_{t-1}}, \\epsilon)},\\ t^{p}\\Big), \\qquad
        u_t = m_t, \\qquad v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2

    for :math:`t \\ge 1`, where the first call (:math:`t = 0`) only sets :math:`v_0` and outputs
    zeros, and :math:`\\mathrm{clip}(x, c)` bounds every element to :math:`[-c, c]` with
    :math:`c = t^{p}`, :math:`p` = ``clip_exp`` (no clipping when ``None``). The gradient is divided
    by the second moment of the steps *before* it, which is what lets ADOPT converge for any
    :math:`\\beta_2`; the momentum is taken after the normalisation, and there is no bias correction.
    """

    def init(params):
        return ScaleByAdoptState(count=step_count(params), mu=_tree.zeros_like(params), nu=_tree.zeros_like(params))

    def update(updates, state, params=None, **extra):
        # t in the paper's (and the official code's) numbering: the first call is t = 0.
        t = state.count
        first = t == 0
        clip = None if clip_exp is None else hoist(t.to(torch.float64) ** clip_exp)

        def one(g: Tensor, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            normed = g / v.sqrt().clamp(min=cast(eps, v))
            if clip is not None:
                bound = cast(clip, normed)
                normed = normed.clamp(min=-bound, max=bound)
            # The first call only initialises v with g^2 (v_0 = g_0^2, not (1 - b2) g_0^2); m stays 0.
            m = torch.where(first, m, _ema(m, normed, b1))
            v = torch.where(first, v + g * g, _ema_of_squares(v, g, b2))
            return m, v

        mu, nu = _tree.map_many(one, updates, state.mu, state.nu, n=2)
        return mu, ScaleByAdoptState(count=state.count + 1, mu=mu, nu=nu)

    return GradientTransformation(init, update)
