"""Schedule-free learning (Defazio et al., 2024): averaging in place of a learning-rate schedule."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree
from .._hoist import hoist
from ..base import GradientTransformation, Params, register_state, require_params, step_count
from ._adam import _ema_of_squares

cast = _tree.scalar_for


@register_state
class ScaleByScheduleFreeState(NamedTuple):
    count: Tensor  # updates done so far, 0-d int64
    b1: Tensor  # the interpolation weight of the last update, 0-d float64: eval params need it
    lr_max: Tensor  # largest (warmed-up) learning rate so far, 0-d float64; -1 before the first update
    weight_sum: Tensor  # sum of the averaging weights so far, 0-d float64
    z: Params  # the base (SGD) sequence; the params themselves hold y, the gradient point


def scale_by_schedule_free(
    learning_rate: float | Tensor,
    b1: float | Tensor = 0.9,
    warmup_steps: int = 0,
    r: float | Tensor = 0.0,
    weight_lr_power: float | Tensor = 2.0,
) -> GradientTransformation:
    """Schedule-free averaging of a base direction :math:`u_t`, as ``schedulefree``'s optimisers do it.

    The params hold :math:`y`, where gradients are evaluated; the state holds :math:`z`, and the
    average :math:`x` (the point to evaluate and save) is implied by :math:`y = (1-\\beta_1) z + \\beta_1 x`
    (see ``schedule_free_eval_params``). With :math:`\\gamma_t = \\gamma\\min(1, t/\\text{warmup})`:

    .. math::
        w_t = t^r \\max_{i\\le t}(\\gamma_i)^p, \\quad c_t = w_t / \\textstyle\\sum_{i\\le t} w_i, \\quad
        z_t = z_{t-1} - \\gamma_t u_t, \\quad x_t = (1-c_t)\\,x_{t-1} + c_t z_t

    and the output is :math:`y_t - y_{t-1} = c_t (z_{t-1} - y_{t-1}) + \\gamma_t(\\beta_1(1-c_t) - 1)\\,u_t`.
    The incoming updates are the base direction (e.g. the RMS-normalised gradient plus
    ``weight_decay * y`` for AdamW; the gradient for SGD); the output is the whole step, learning
    rate included, so it ends a chain. Needs ``params``.
    """

    def init(params):
        count = step_count(params)
        scalar = lambda value: torch.full((), value, dtype=torch.float64, device=count.device)
        return ScaleByScheduleFreeState(
            count=count,
            b1=_float64(b1, count),
            lr_max=scalar(-1.0),
            weight_sum=scalar(0.0),
            z=_tree.map(lambda p: p.clone(memory_format=torch.preserve_format), params),
        )

    def update(updates, state, params=None, **extra):
        require_params("scale_by_schedule_free", params)
        t = state.count.to(torch.float64) + 1  # the 1-based step
        lr = learning_rate * (torch.clamp(t / warmup_steps, max=1.0) if warmup_steps > 0 else 1.0)
        lr_max = torch.maximum(state.lr_max, _float64(lr, state.count))
        weight = t**r * lr_max**weight_lr_power
        weight_sum = state.weight_sum + weight
        # The package sets c = 0 when every weight so far is 0 (lr = 0 with weight_lr_power > 0).
        ckp1 = torch.where(weight_sum == 0, 0.0, weight / torch.where(weight_sum == 0, 1.0, weight_sum))
        y_coefficient = lr * (b1 * (1 - ckp1) - 1)
        ckp1, y_coefficient, lr = hoist(ckp1, y_coefficient, lr)

        def one(u: Tensor, y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
            step = (z - y) * cast(ckp1, y) + u * cast(y_coefficient, u)
            return step, z - u * cast(lr, u)

        out, z = _tree.map_many(one, updates, params, state.z, n=2)
        new_state = ScaleByScheduleFreeState(
            count=state.count + 1, b1=_float64(b1, state.count), lr_max=lr_max, weight_sum=weight_sum, z=z
        )
        return out, new_state

    return GradientTransformation(init, update)


def _float64(value: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64, device=like.device).reshape(())


@register_state
class ScaleByBiasCorrectedRmsState(NamedTuple):
    count: Tensor  # updates done so far, 0-d int64
    nu: Params  # EMA of squared gradients


def scale_by_bias_corrected_rms(b2: float | Tensor = 0.999, eps: float | Tensor = 1e-8) -> GradientTransformation:
    """Adam's second-moment normalisation alone (no first moment), as AdamWScheduleFree uses it.

    .. math::
        v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2, \\qquad u_t = \\frac{g_t}{\\sqrt{v_t / (1-\\beta_2^t)} + \\epsilon}

    Equal to ``scale_by_adam(b1=0, b2, eps)`` without its first-moment buffer (one parameter-sized
    tensor less).
    """

    def init(params):
        return ScaleByBiasCorrectedRmsState(count=step_count(params), nu=_tree.zeros_like(params))

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        bias_correction2 = hoist(1 - b2 ** count.to(torch.float64))

        def one(g: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            nu = _ema_of_squares(v, g, b2)
            return g / ((nu / cast(bias_correction2, nu)).sqrt() + cast(eps, nu)), nu

        out, nu = _tree.map_many(one, updates, state.nu, n=2)
        return out, ScaleByBiasCorrectedRmsState(count=count, nu=nu)

    return GradientTransformation(init, update)
