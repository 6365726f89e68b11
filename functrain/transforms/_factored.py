"""Adafactor's factored second moment (Shazeer & Stern, 2018), as torch.optim.Adafactor computes it."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree
from .._hoist import hoist
from ..base import GradientTransformation, Params, register_state, step_count

cast = _tree.scalar_for


@register_state
class ScaleByFactoredRmsState(NamedTuple):
    """Per leaf, either the two factors (tensors of 2 or more dims) or the full variance (0-d, 1-D);
    the slot a leaf does not use holds an empty placeholder, so all three trees match the params."""

    count: Tensor  # updates done so far, 0-d int64
    row: Params  # EMA of mean(g^2) over the last dim, shape [..., R, 1]
    col: Params  # EMA of mean(g^2) over the second-to-last dim, shape [..., 1, C]
    variance: Params  # EMA of g^2, the param's shape


def _factored(t: Tensor) -> bool:
    return t.dim() > 1


def _placeholder(p: Tensor) -> Tensor:
    return p.new_zeros((0,))


def _mean_square(g: Tensor, dim: int) -> Tensor:
    """``mean(g * g, dim)`` without materialising ``g * g``, written as torch.optim writes it; an
    empty dim gives 0 (not 0/0), so an empty parameter leaves its state finite."""
    return torch.linalg.vector_norm(g, dim=dim, keepdim=True).square() / max(g.size(dim), 1)


def scale_by_factored_rms(
    lr: float | Tensor = 1e-2,
    beta2_decay: float | Tensor = -0.8,
    eps1: float | Tensor | None = None,
    eps2: float | Tensor = 1e-3,
    d: float | Tensor = 1.0,
) -> GradientTransformation:
    """Adafactor's step: a factored second-moment estimate, update clipping and the relative step size.

    With :math:`t` the 1-based step, :math:`\\hat\\beta_{2,t} = 1 - t^{c}` (``c = beta2_decay``) and
    :math:`R, C` the row and column factors of each tensor of two or more dims (over its last two):

    .. math::
        R_t = \\hat\\beta_{2,t} R_{t-1} + (1-\\hat\\beta_{2,t})\\,\\mathrm{mean}_{-1}(g_t^2),\\quad
        C_t = \\hat\\beta_{2,t} C_{t-1} + (1-\\hat\\beta_{2,t})\\,\\mathrm{mean}_{-2}(g_t^2),\\quad
        \\hat V_t = \\frac{R_t C_t}{\\max(\\mathrm{mean}_{-2}(R_t), \\epsilon_1)}\\\\
        U_t = g_t / \\sqrt{\\max(\\hat V_t, \\epsilon_1^2)},\\quad
        \\alpha_t = \\max(\\epsilon_2, \\mathrm{RMS}(\\theta_{t-1}))\\,\\min(\\mathrm{lr}, 1/\\sqrt t),\\quad
        u_t = \\alpha_t\\, U_t / \\max(1, \\mathrm{RMS}(U_t)/d)

    0-d and 1-D tensors keep the full :math:`V_t` (the same EMA of :math:`g_t^2`) instead of factors.
    The output is the whole step, to be subtracted: the learning rate enters only through the
    relative step size :math:`\\alpha_t`, which is why this transform takes ``lr`` and needs ``params``.
    ``eps1=None`` means the machine epsilon of each parameter's dtype.
    """

    def init(params):
        def slots(p):
            if not _factored(p):
                return _placeholder(p), _placeholder(p), torch.zeros_like(p, memory_format=torch.preserve_format)
            row_shape, col_shape = list(p.shape), list(p.shape)
            row_shape[-1] = 1
            col_shape[-2] = 1
            return p.new_zeros(row_shape), p.new_zeros(col_shape), _placeholder(p)

        row, col, variance = _tree.map_many(slots, params, n=3)
        return ScaleByFactoredRmsState(step_count(params), row, col, variance)

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("scale_by_factored_rms needs params (for RMS(param)): call update(updates, state, params)")
        count = state.count + 1
        t = count.to(torch.float64)
        weight = t**beta2_decay  # 1 - beta2_t, the weight of the new g^2
        relative_step = torch.clamp(1 / t.sqrt(), max=lr)
        weight, relative_step = hoist(weight, relative_step)

        def step(g, p, row, col, variance):
            eps1_ = torch.finfo(p.dtype).eps if eps1 is None else eps1
            if _factored(g):
                row = row.lerp(_mean_square(g, -1), cast(weight, row))
                col = col.lerp(_mean_square(g, -2), cast(weight, col))
                estimate = (row @ col) / row.mean(dim=-2, keepdim=True).clamp(min=cast(eps1_, row))
            else:
                variance = variance.lerp(g * g, cast(weight, variance))
                estimate = variance
            direction = estimate.clamp(min=cast(eps1_ * eps1_, estimate)).rsqrt() * g
            # torch.optim reads both RMS values back as doubles (``.item()``) and forms the step
            # size in double precision; the empty-tensor guard avoids its 0/0.
            param_rms = p.norm(2).to(torch.float64) / max(p.numel(), 1) ** 0.5
            alpha = torch.clamp(param_rms, min=eps2) * relative_step
            clip = torch.clamp(direction.norm(2).to(torch.float64) / (max(direction.numel(), 1) ** 0.5 * d), min=1.0)
            return direction * cast(alpha / clip, direction), row, col, variance

        out, row, col, variance = _tree.map_many(step, updates, params, state.row, state.col, state.variance, n=4)
        return out, ScaleByFactoredRmsState(count, row, col, variance)

    return GradientTransformation(init, update)
