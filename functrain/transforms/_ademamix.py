"""AdEMAMix: Adam's fast momentum mixed with a slow one (Pagliardini et al., 2024)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree
from .._hoist import hoist
from ..base import GradientTransformation, Params, register_state, step_count
from ._adam import _adam_direction, _bias_corrections, _ema, _ema_of_squares

cast = _tree.scalar_for


@register_state
class ScaleByAdemamixState(NamedTuple):
    count: Tensor  # updates done so far, 0-d int64
    mu: Params  # fast first moment (EMA of gradients, rate b1)
    nu: Params  # second moment (EMA of squared gradients, rate b2)
    mu_slow: Params  # slow first moment (EMA of gradients, rate b3), not bias-corrected


def ademamix_alpha(t: Tensor, alpha: float | Tensor, warmup: int | None) -> Tensor | float:
    """The paper's alpha scheduler: :math:`\\alpha_t = \\min(t\\alpha / T, \\alpha)`, ``t`` the 1-based
    step as a float64 tensor and :math:`T` = ``warmup`` (``None``: no warmup, :math:`\\alpha`)."""
    if warmup is None:
        return alpha
    return torch.clamp(t * alpha / warmup, max=torch.as_tensor(alpha, dtype=torch.float64))


def ademamix_beta3(t: Tensor, b1: float | Tensor, b3: float | Tensor, warmup: int | None) -> Tensor | float:
    """The paper's beta3 scheduler: the half-life grows linearly from :math:`\\beta_1`'s to
    :math:`\\beta_3`'s over :math:`T` = ``warmup`` steps,

    .. math::
        \\beta_3(t) = \\min\\Big(\\exp\\Big(\\frac{\\ln\\beta_1 \\ln\\beta_3}
                      {(1 - t/T)\\ln\\beta_3 + (t/T)\\ln\\beta_1}\\Big),\\ \\beta_3\\Big)

    (``t`` the 1-based step as a float64 tensor; ``None``: no warmup, :math:`\\beta_3`)."""
    if warmup is None:
        return b3
    log_b1 = torch.log(torch.as_tensor(b1, dtype=torch.float64))
    log_b3 = torch.log(torch.as_tensor(b3, dtype=torch.float64))
    a = t / warmup
    beta3 = torch.exp(log_b1 * log_b3 / ((1 - a) * log_b3 + a * log_b1))
    return torch.clamp(beta3, max=torch.as_tensor(b3, dtype=torch.float64))


def scale_by_ademamix(
    b1: float | Tensor = 0.9,
    b2: float | Tensor = 0.999,
    b3: float | Tensor = 0.9999,
    alpha: float | Tensor = 5.0,
    t_alpha_beta3: int | None = None,
    eps: float | Tensor = 1e-8,
) -> GradientTransformation:
    """AdEMAMix's direction (Pagliardini et al., 2024, Algorithm 1, without the weight decay).

    .. math::
        m^{(1)}_t &= \\beta_1 m^{(1)}_{t-1} + (1-\\beta_1) g_t, \\qquad
        m^{(2)}_t = \\beta_3(t)\\, m^{(2)}_{t-1} + (1-\\beta_3(t))\\, g_t, \\qquad
        \\nu_t = \\beta_2 \\nu_{t-1} + (1-\\beta_2) g_t^2 \\\\
        u_t &= \\frac{m^{(1)}_t/(1-\\beta_1^t) + \\alpha_t m^{(2)}_t}{\\sqrt{\\nu_t}/\\sqrt{1-\\beta_2^t} + \\epsilon}

    with :math:`\\alpha_t` and :math:`\\beta_3(t)` the warmup schedulers :func:`ademamix_alpha` and
    :func:`ademamix_beta3` over ``t_alpha_beta3`` steps (constant without it). The slow EMA is not
    bias-corrected: it starts at zero and its weight :math:`\\alpha_t` grows from zero instead.
    """

    def init(params):
        zeros = _tree.zeros_like
        return ScaleByAdemamixState(step_count(params), zeros(params), zeros(params), zeros(params))

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        t = count.to(torch.float64)
        bc1, bc2_sqrt = _bias_corrections(count, b1, b2)
        alpha_t, b3_t = hoist(ademamix_alpha(t, alpha, t_alpha_beta3), ademamix_beta3(t, b1, b3, t_alpha_beta3))

        def one(g: Tensor, m: Tensor, v: Tensor, m_slow: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            m, v, m_slow = _ema(m, g, b1), _ema_of_squares(v, g, b2), _ema(m_slow, g, b3_t)
            # Adam's direction with the slow momentum added to the corrected fast one: (m/bc1 + a m_slow) / denom.
            fast = m / cast(bc1, m)
            direction = _adam_direction(fast + m_slow * cast(alpha_t, m_slow), v, 1.0, bc2_sqrt, eps)
            return direction, m, v, m_slow

        out, mu, nu, mu_slow = _tree.map_many(one, updates, state.mu, state.nu, state.mu_slow, n=4)
        return out, ScaleByAdemamixState(count, mu, nu, mu_slow)

    return GradientTransformation(init, update)
