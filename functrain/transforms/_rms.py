"""Per-element scaling by accumulated squared gradients: RMSprop, Adagrad and Adadelta.

Each function writes its arithmetic in the order torch.optim's single-tensor loop does (e.g.
``v * alpha + (1 - alpha) * g * g`` for ``v.mul_(alpha).addcmul_(g, g, value=1 - alpha)``), so in
float64 the only difference from torch.optim is where the learning rate multiplies in. The
multi-tensor paths run the same operations in the same order over lists, so they agree with the
per-leaf forms to the bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree
from ..base import GradientTransformation, Params, register_state

cast = _tree.scalar_for


def _ema_of_squares(v: Tensor, g: Tensor, decay) -> Tensor:
    """``decay * v + (1 - decay) * g**2``, as ``v.mul_(decay).addcmul_(g, g, value=1 - decay)``."""
    return v * cast(decay, v) + cast(1 - decay, g) * g * g


def _foreach_ema_of_squares(vs: list[Tensor], gs: list[Tensor], decay) -> list[Tensor]:
    """:func:`_ema_of_squares` over lists, op for op (so the two paths agree to the bit)."""
    squares = torch._foreach_mul(gs, cast(1 - decay, gs[0]))
    torch._foreach_mul_(squares, gs)
    out = torch._foreach_mul(vs, cast(decay, vs[0]))
    torch._foreach_add_(out, squares)
    return out


def _foreach_divide_by_root_plus_eps(gs: list[Tensor], sums: list[Tensor], eps) -> list[Tensor]:
    """``g / (sqrt(s) + eps)`` over lists; consumes nothing it is given."""
    denom = torch._foreach_sqrt(sums)
    torch._foreach_add_(denom, cast(eps, sums[0]))
    return torch._foreach_div(gs, denom)


def _fast(updates) -> bool:
    return _tree.fast_path_ok(updates)


def _initial(params: Params, value) -> Params:
    if isinstance(value, (int, float)) and value == 0:
        return _tree.zeros_like(params)
    return _tree.full_like(params, value)


@register_state
class ScaleByRmsState(NamedTuple):
    nu: Params  # EMA of squared gradients


def scale_by_rms(
    alpha: float | Tensor = 0.99, eps: float | Tensor = 1e-8, initial_scale: float | Tensor = 0.0
) -> GradientTransformation:
    """RMSprop's scaling, with torch.optim.RMSprop's ``eps`` outside the square root.

    .. math::
        v_t = \\alpha v_{t-1} + (1-\\alpha) g_t^2, \\qquad u_t = \\frac{g_t}{\\sqrt{v_t} + \\epsilon}

    ``initial_scale`` is :math:`v_0` (torch.optim starts from 0).
    """

    def init(params):
        return ScaleByRmsState(nu=_initial(params, initial_scale))

    def multi_tensor(gs, vs):
        nu = _foreach_ema_of_squares(vs, gs, alpha)
        return nu, _foreach_divide_by_root_plus_eps(gs, nu, eps)

    def update(updates, state, params=None, **extra):
        if _fast(updates):
            nu, out = _tree.foreach_map(multi_tensor, updates, state.nu)
        else:
            nu = _tree.map(lambda v, g: _ema_of_squares(v, g, alpha), state.nu, updates)
            out = _tree.map(lambda g, v: g / (v.sqrt() + cast(eps, v)), updates, nu)
        return out, ScaleByRmsState(nu=nu)

    return GradientTransformation(init, update)


@register_state
class ScaleByStddevState(NamedTuple):
    mu: Params  # EMA of gradients
    nu: Params  # EMA of squared gradients


def scale_by_stddev(
    alpha: float | Tensor = 0.99, eps: float | Tensor = 1e-8, initial_scale: float | Tensor = 0.0
) -> GradientTransformation:
    """Centred RMSprop's scaling (torch.optim.RMSprop(centered=True)): divides by an estimate of the
    gradient's standard deviation instead of its root mean square.

    .. math::
        m_t = \\alpha m_{t-1} + (1-\\alpha) g_t, \\quad v_t = \\alpha v_{t-1} + (1-\\alpha) g_t^2, \\quad
        u_t = \\frac{g_t}{\\sqrt{v_t - m_t^2} + \\epsilon}

    ``initial_scale`` is :math:`v_0`; :math:`m_0 = 0`.
    """

    def init(params):
        return ScaleByStddevState(mu=_tree.zeros_like(params), nu=_initial(params, initial_scale))

    def multi_tensor(gs, ms, vs):
        nu = _foreach_ema_of_squares(vs, gs, alpha)
        weight = cast(1 - alpha, ms[0])
        if isinstance(weight, Tensor):  # no foreach lerp takes a tensor weight: lerp leaf by leaf
            mu = [m.lerp(g, weight) for m, g in zip(ms, gs)]
        else:
            mu = torch._foreach_lerp(ms, gs, weight)
        variance = torch._foreach_sub(nu, torch._foreach_mul(mu, mu))
        return mu, nu, _foreach_divide_by_root_plus_eps(gs, variance, eps)

    def update(updates, state, params=None, **extra):
        if _fast(updates):
            mu, nu, out = _tree.foreach_map(multi_tensor, updates, state.mu, state.nu)
        else:
            nu = _tree.map(lambda v, g: _ema_of_squares(v, g, alpha), state.nu, updates)
            # torch.optim: grad_avg.lerp_(grad, 1 - alpha)
            mu = _tree.map(lambda m, g: m.lerp(g, cast(1 - alpha, m)), state.mu, updates)
            # As torch.optim, v - m^2 is not clamped: rounding can make it negative only where the
            # gradient has been constant, and the NaN that follows is torch.optim's too.
            out = _tree.map(lambda g, m, v: g / ((v - m * m).sqrt() + cast(eps, v)), updates, mu, nu)
        return out, ScaleByStddevState(mu=mu, nu=nu)

    return GradientTransformation(init, update)


@register_state
class ScaleByRssState(NamedTuple):
    sum_of_squares: Params  # initial_accumulator_value + sum of squared gradients so far


def scale_by_rss(
    initial_accumulator_value: float | Tensor = 0.0, eps: float | Tensor = 1e-10
) -> GradientTransformation:
    """Adagrad's scaling by the root of the sum of squared gradients, as torch.optim.Adagrad
    (``eps`` outside the square root).

    .. math::
        s_t = s_{t-1} + g_t^2 \\; (s_0 = \\text{initial\\_accumulator\\_value}), \\qquad
        u_t = \\frac{g_t}{\\sqrt{s_t} + \\epsilon}
    """

    def init(params):
        return ScaleByRssState(sum_of_squares=_initial(params, initial_accumulator_value))

    def multi_tensor(gs, ss):
        sums = torch._foreach_mul(gs, gs)
        torch._foreach_add_(sums, ss)  # s + g*g: addition commutes exactly
        return sums, _foreach_divide_by_root_plus_eps(gs, sums, eps)

    def update(updates, state, params=None, **extra):
        if _fast(updates):
            sums, out = _tree.foreach_map(multi_tensor, updates, state.sum_of_squares)
        else:
            sums = _tree.map(lambda s, g: s + g * g, state.sum_of_squares, updates)
            out = _tree.map(lambda g, s: g / (s.sqrt() + cast(eps, s)), updates, sums)
        return out, ScaleByRssState(sum_of_squares=sums)

    return GradientTransformation(init, update)


@register_state
class ScaleByAdadeltaState(NamedTuple):
    nu: Params  # EMA of squared gradients
    delta_nu: Params  # EMA of squared updates


def scale_by_adadelta(rho: float | Tensor = 0.9, eps: float | Tensor = 1e-6) -> GradientTransformation:
    """Adadelta's scaling (Zeiler, 2012), as torch.optim.Adadelta computes it.

    .. math::
        v_t = \\rho v_{t-1} + (1-\\rho) g_t^2, \\quad
        u_t = \\frac{\\sqrt{a_{t-1} + \\epsilon}}{\\sqrt{v_t + \\epsilon}}\\, g_t, \\quad
        a_t = \\rho a_{t-1} + (1-\\rho) u_t^2

    The learning rate (1 in the paper) multiplies :math:`u_t` afterwards.
    """

    def init(params):
        return ScaleByAdadeltaState(nu=_tree.zeros_like(params), delta_nu=_tree.zeros_like(params))

    def multi_tensor(gs, vs, accs):
        nu = _foreach_ema_of_squares(vs, gs, rho)
        std = torch._foreach_add(nu, cast(eps, vs[0]))
        torch._foreach_sqrt_(std)
        out = torch._foreach_add(accs, cast(eps, accs[0]))
        torch._foreach_sqrt_(out)
        torch._foreach_div_(out, std)
        torch._foreach_mul_(out, gs)
        return nu, _foreach_ema_of_squares(accs, out, rho), out

    def update(updates, state, params=None, **extra):
        if _fast(updates):
            nu, delta_nu, out = _tree.foreach_map(multi_tensor, updates, state.nu, state.delta_nu)
        else:
            nu = _tree.map(lambda v, g: _ema_of_squares(v, g, rho), state.nu, updates)
            out = _tree.map(
                lambda g, v, a: (a + cast(eps, a)).sqrt() / (v + cast(eps, v)).sqrt() * g, updates, nu, state.delta_nu
            )
            delta_nu = _tree.map(lambda a, u: _ema_of_squares(a, u, rho), state.delta_nu, out)
        return out, ScaleByAdadeltaState(nu=nu, delta_nu=delta_nu)

    return GradientTransformation(init, update)
