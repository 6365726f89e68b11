"""Adam's relatives in torch.optim: NAdam, RAdam and Adamax."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree
from .._hoist import hoist
from ..base import GradientTransformation, Params, register_state, step_count
from ._adam import ScaleByAdamState, _bias_corrections, _ema, _ema_of_squares

cast = _tree.scalar_for


# ----------------------------------------------------------------------------- NAdam


@register_state
class ScaleByNadamState(NamedTuple):
    count: Tensor  # updates done so far, 0-d int64
    mu_product: Tensor  # prod_{i<=t} mu_i, 0-d, in torch.optim's scalar dtype (see `_torch_scalar_dtype`)
    mu: Params  # first moment (EMA of gradients)
    nu: Params  # second moment (EMA of squared gradients)


def _torch_scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps its per-parameter scalars in (``optimizer._get_scalar_dtype``).

    NAdam's ``mu_product`` is a running product, so its rounding accumulates: holding it in the same
    dtype as torch.optim (float32 unless the default dtype is float64) is what keeps the two equal.
    """
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def scale_by_nadam(
    b1: float | Tensor = 0.9,
    b2: float | Tensor = 0.999,
    eps: float | Tensor = 1e-8,
    momentum_decay: float | Tensor = 4e-3,
) -> GradientTransformation:
    """NAdam's direction (Dozat, 2016) with torch.optim.NAdam's momentum schedule and ``eps`` placement.

    .. math::
        \\mu_t = \\beta_1 (1 - \\tfrac12 0.96^{t\\psi}),\\quad
        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t,\\quad v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2,\\\\
        u_t = \\Big(\\frac{1-\\mu_t}{1-\\prod_{i\\le t}\\mu_i} g_t
              + \\frac{\\mu_{t+1}}{1-\\prod_{i\\le t+1}\\mu_i} m_t\\Big) \\Big/
              \\Big(\\sqrt{v_t / (1-\\beta_2^t)} + \\epsilon\\Big)

    with :math:`\\psi` the ``momentum_decay``.
    """

    def init(params):
        count = step_count(params)
        mu_product = torch.ones((), dtype=_torch_scalar_dtype(), device=count.device)
        return ScaleByNadamState(count, mu_product, _tree.zeros_like(params), _tree.zeros_like(params))

    def momentum_at(t: Tensor) -> Tensor:
        return b1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        t = count.to(torch.float64)
        mu_t, mu_next = momentum_at(t), momentum_at(t + 1)
        # torch.optim multiplies its stored product by mu_t in the product's dtype, then reads the
        # product back as a double for the coefficients.
        mu_product = state.mu_product * mu_t.to(state.mu_product.dtype)
        product = mu_product.to(torch.float64)
        grad_weight = (1.0 - mu_t) / (1.0 - product)
        momentum_weight = mu_next / (1.0 - product * mu_next)
        grad_weight, momentum_weight, bc2 = hoist(grad_weight, momentum_weight, 1 - b2**t)
        mu = _tree.map(lambda m, g: _ema(m, g, b1), state.mu, updates)
        nu = _tree.map(lambda v, g: _ema_of_squares(v, g, b2), state.nu, updates)

        def direction(g, m, v):
            denom = (v / cast(bc2, v)).sqrt() + cast(eps, v)
            return (g / denom) * cast(grad_weight, g) + (m / denom) * cast(momentum_weight, m)

        out = _tree.map(direction, updates, mu, nu)
        return out, ScaleByNadamState(count, mu_product, mu, nu)

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------- RAdam


@register_state
class ScaleByRadamState(NamedTuple):
    count: Tensor  # updates done so far, 0-d int64
    mu: Params  # first moment (EMA of gradients)
    nu: Params  # second moment (EMA of squared gradients)


def _rectification(count: Tensor, b2) -> tuple[Tensor, Tensor]:
    """RAdam's ``(rho_t > 5, r_t)``: whether the variance is tractable, and its rectification term.

    ``r_t`` is only used where ``rho_t > 5``; there ``rho_inf > rho_t > 5``, so every factor is
    positive. Elsewhere the ratio may be negative or 0/0 (e.g. ``b2 = 0.6`` gives ``rho_inf = 4``),
    so the denominator and the ratio are replaced by 1 there: the unused branch, and the gradient
    that ``torch.where`` sends through it (zero times its local derivative), stay finite.
    """
    t = count.to(torch.float64)
    b2_t = b2**t
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2_t / (1 - b2_t)
    tractable = rho_t > 5.0
    numerator = (rho_t - 4) * (rho_t - 2) * rho_inf
    denominator = torch.where(tractable, (rho_inf - 4) * (rho_inf - 2) * rho_t, 1.0)
    ratio = torch.where(tractable, numerator / denominator, 1.0)
    return hoist(tractable, ratio.clamp(min=0.0).sqrt())


def scale_by_radam(
    b1: float | Tensor = 0.9, b2: float | Tensor = 0.999, eps: float | Tensor = 1e-8
) -> GradientTransformation:
    """RAdam's direction (Liu et al., 2020), as torch.optim.RAdam computes it.

    .. math::
        \\rho_\\infty = \\frac{2}{1-\\beta_2} - 1,\\quad
        \\rho_t = \\rho_\\infty - \\frac{2 t \\beta_2^t}{1-\\beta_2^t},\\quad
        r_t = \\sqrt{\\frac{(\\rho_t-4)(\\rho_t-2)\\rho_\\infty}{(\\rho_\\infty-4)(\\rho_\\infty-2)\\rho_t}},\\\\
        u_t = \\frac{m_t}{1-\\beta_1^t} \\cdot
              \\begin{cases} r_t \\sqrt{1-\\beta_2^t} / (\\sqrt{v_t} + \\epsilon) & \\rho_t > 5 \\\\
                              1 & \\text{otherwise} \\end{cases}

    with :math:`m_t, v_t` Adam's moments.
    """

    def init(params):
        return ScaleByRadamState(step_count(params), _tree.zeros_like(params), _tree.zeros_like(params))

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        bc1, bc2_sqrt = _bias_corrections(count, b1, b2)
        tractable, rect = _rectification(count, b2)
        mu = _tree.map(lambda m, g: _ema(m, g, b1), state.mu, updates)
        nu = _tree.map(lambda v, g: _ema_of_squares(v, g, b2), state.nu, updates)

        def direction(m, v):
            corrected = m / cast(bc1, m)
            # torch.optim writes sqrt(1 - b2^t) / (sqrt(v) + eps) as float / tensor, which is
            # reciprocal-then-multiply.
            adaptive = (v.sqrt() + cast(eps, v)).reciprocal() * cast(bc2_sqrt, v)
            return torch.where(tractable, corrected * adaptive * cast(rect, m), corrected)

        out = _tree.map(direction, mu, nu)
        return out, ScaleByRadamState(count, mu, nu)

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------- Adamax


def scale_by_adamax(
    b1: float | Tensor = 0.9, b2: float | Tensor = 0.999, eps: float | Tensor = 1e-8
) -> GradientTransformation:
    """Adamax's direction (Kingma & Ba, 2015, section 7.1), as torch.optim.Adamax computes it.

    .. math::
        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t,\\quad
        u_t^{\\infty} = \\max(\\beta_2 u_{t-1}^{\\infty}, |g_t| + \\epsilon),\\quad
        u_t = \\frac{m_t}{(1-\\beta_1^t)\\, u_t^{\\infty}}

    The state is Adam's ``(count, mu, nu)`` with ``nu`` the infinity norm :math:`u^\\infty`.
    """

    def init(params):
        return ScaleByAdamState(step_count(params), _tree.zeros_like(params), _tree.zeros_like(params))

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        bc1, _ = _bias_corrections(count, b1, b2)
        mu = _tree.map(lambda m, g: _ema(m, g, b1), state.mu, updates)
        nu = _tree.map(lambda u, g: torch.maximum(u * cast(b2, u), g.abs() + cast(eps, g)), state.nu, updates)
        out = _tree.map(lambda m, u: (m / u) / cast(bc1, m), mu, nu)
        return out, ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)
