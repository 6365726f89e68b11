"""The Adam family: first and second moment estimates with bias correction."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree
from .._hoist import hoist
from ..base import GradientTransformation, Params, register_state, step_count

cast = _tree.scalar_for


@register_state
class ScaleByAdamState(NamedTuple):
    count: Tensor  # updates done so far, 0-d int64
    mu: Params  # first moment (EMA of gradients)
    nu: Params  # second moment (EMA of squared gradients)


def _ema(moment: Tensor, value: Tensor, decay) -> Tensor:
    """``decay * moment + (1 - decay) * value``, computed as torch.optim does (a lerp)."""
    return moment.lerp(value, cast(1 - decay, moment))


def _ema_of_squares(moment: Tensor, value: Tensor, decay) -> Tensor:
    return moment * cast(decay, moment) + value * value * cast(1 - decay, value)


def _bias_corrections(count: Tensor, b1, b2) -> tuple[Tensor, Tensor]:
    """``1 - b1**t`` and ``sqrt(1 - b2**t)`` in float64, ``t`` the 1-based step (as torch.optim)."""
    t = count.to(torch.float64)
    return hoist(1 - b1**t, (1 - b2**t).sqrt())


def scale_by_adam(
    b1: float | Tensor = 0.9, b2: float | Tensor = 0.999, eps: float | Tensor = 1e-8
) -> GradientTransformation:
    """Adam's direction (Kingma & Ba, 2015), with torch.optim.Adam's placement of ``eps``.

    .. math::
        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t,\\quad v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2,\\quad
        u_t = \\frac{m_t / (1-\\beta_1^t)}{\\sqrt{v_t} / \\sqrt{1-\\beta_2^t} + \\epsilon}
    """

    def init(params):
        return ScaleByAdamState(count=step_count(params), mu=_tree.zeros_like(params), nu=_tree.zeros_like(params))

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        bc1, bc2_sqrt = _bias_corrections(count, b1, b2)
        if _tree.fast_path_ok(updates):
            mu, nu, out = _tree.foreach_map(
                lambda gs, ms, vs: _adam_foreach(gs, ms, vs, None, b1, b2, eps, bc1, bc2_sqrt),
                updates,
                state.mu,
                state.nu,
            )
        else:
            mu = _tree.map(lambda m, g: _ema(m, g, b1), state.mu, updates)
            nu = _tree.map(lambda v, g: _ema_of_squares(v, g, b2), state.nu, updates)
            out = _tree.map(lambda m, v: _adam_direction(m, v, bc1, bc2_sqrt, eps), mu, nu)
        return out, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def _adam_direction(m: Tensor, v: Tensor, bc1, bc2_sqrt, eps) -> Tensor:
    return (m / cast(bc1, m)) / (v.sqrt() / cast(bc2_sqrt, v) + cast(eps, v))


@register_state
class ScaleByAmsgradState(NamedTuple):
    count: Tensor
    mu: Params
    nu: Params
    nu_max: Params  # running maximum of nu, before bias correction (as torch.optim)


def scale_by_amsgrad(
    b1: float | Tensor = 0.9, b2: float | Tensor = 0.999, eps: float | Tensor = 1e-8
) -> GradientTransformation:
    """AMSGrad (Reddi et al., 2018) as torch.optim.Adam(amsgrad=True): Adam whose denominator uses
    the running maximum of the (uncorrected) second moment, ``v_max = max(v_max, v_t)``."""

    def init(params):
        zeros = _tree.zeros_like
        return ScaleByAmsgradState(step_count(params), zeros(params), zeros(params), zeros(params))

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        bc1, bc2_sqrt = _bias_corrections(count, b1, b2)
        if _tree.fast_path_ok(updates):
            mu, nu, nu_max, out = _tree.foreach_map(
                lambda gs, ms, vs, vmaxs: _adam_foreach(gs, ms, vs, vmaxs, b1, b2, eps, bc1, bc2_sqrt),
                updates,
                state.mu,
                state.nu,
                state.nu_max,
            )
        else:
            mu = _tree.map(lambda m, g: _ema(m, g, b1), state.mu, updates)
            nu = _tree.map(lambda v, g: _ema_of_squares(v, g, b2), state.nu, updates)
            nu_max = _tree.map(torch.maximum, state.nu_max, nu)
            out = _tree.map(lambda m, v: _adam_direction(m, v, bc1, bc2_sqrt, eps), mu, nu_max)
        return out, ScaleByAmsgradState(count, mu, nu, nu_max)

    return GradientTransformation(init, update)


def _adam_foreach(gs, ms, vs, vmaxs, b1, b2, eps, bc1, bc2_sqrt):
    """The multi-tensor form of Adam / AMSGrad. Mirrors `_ema`, `_ema_of_squares`, `_adam_direction`.

    Each new list is allocated once and then updated in place, so a step moves the same bytes as
    torch.optim's foreach Adam plus one write per new state tensor.
    """
    like = gs[0]
    mu = _foreach_lerp(ms, gs, cast(1 - b1, like))
    nu = torch._foreach_mul(vs, cast(b2, like))
    one_minus_b2 = cast(1 - b2, like)
    if isinstance(one_minus_b2, Tensor):
        torch._foreach_add_(nu, torch._foreach_mul(torch._foreach_mul(gs, gs), one_minus_b2))
    else:
        torch._foreach_addcmul_(nu, gs, gs, value=one_minus_b2)
    outputs = [mu, nu]
    if vmaxs is not None:
        nu_max = torch._foreach_maximum(vmaxs, nu)
        outputs.append(nu_max)
        nu = nu_max
    denom = torch._foreach_sqrt(nu)
    torch._foreach_div_(denom, cast(bc2_sqrt, like))
    torch._foreach_add_(denom, cast(eps, like))
    # (m / bc1) / denom, with the division by bc1 folded into one scalar multiply at the end.
    direction = torch._foreach_div(mu, denom)
    torch._foreach_div_(direction, cast(bc1, like))
    return (*outputs, direction)


def _foreach_lerp(starts, ends, weight):
    if not isinstance(weight, Tensor):
        return torch._foreach_lerp(starts, ends, weight)
    out = torch._foreach_sub(ends, starts)  # start + w * (end - start), torch's lerp for w < 0.5
    torch._foreach_mul_(out, weight)
    torch._foreach_add_(out, starts)
    return out
