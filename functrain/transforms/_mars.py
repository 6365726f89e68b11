"""MARS: a variance-reduced gradient fed to AdamW (Yuan et al., 2024)."""

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
class ScaleByMarsState(NamedTuple):
    count: Tensor  # updates done so far, 0-d int64
    mu: Params  # first moment of the corrected gradients c_t
    nu: Params  # second moment of the corrected gradients c_t
    last_grad: Params  # the previous step's gradient (zeros before the first step)


def scale_by_mars(
    b1: float | Tensor = 0.95,
    b2: float | Tensor = 0.99,
    gamma: float | Tensor = 0.025,
    eps: float | Tensor = 1e-8,
) -> GradientTransformation:
    """MARS-AdamW's direction (Yuan et al., 2024, Algorithm 2, the approximate variant).

    .. math::
        \\tilde c_t &= g_t + \\gamma\\frac{\\beta_1}{1-\\beta_1}(g_t - g_{t-1}), \\qquad
        c_t = \\frac{\\tilde c_t}{\\max(1, \\lVert\\tilde c_t\\rVert_2)} \\\\
        m_t &= \\beta_1 m_{t-1} + (1-\\beta_1) c_t, \\qquad v_t = \\beta_2 v_{t-1} + (1-\\beta_2) c_t^2, \\qquad
        u_t = \\frac{m_t/(1-\\beta_1^t)}{\\sqrt{v_t}/\\sqrt{1-\\beta_2^t} + \\epsilon}

    with :math:`g_0 = 0` and the norm over each whole parameter tensor (a sharded one is reduced
    across its shards). :math:`g_{t-1}` is the previous step's gradient, on the previous batch: the
    paper's approximate MARS, the official code's default (``is_approx=True``) and the only form
    pytorch-optimizer has. Exact MARS needs the gradient at the previous parameters on the current
    batch, a second backward pass per step.
    """

    def init(params):
        zeros = _tree.zeros_like
        return ScaleByMarsState(step_count(params), zeros(params), zeros(params), zeros(params))

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        bc1, bc2_sqrt = _bias_corrections(count, b1, b2)
        correction = hoist(torch.as_tensor(gamma, dtype=torch.float64) * b1 / (1 - b1))

        def one(g: Tensor, m: Tensor, v: Tensor, last: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            c = (g - last) * cast(correction, g) + g
            c = c / _norm(c).clamp(min=1.0).to(c.dtype)  # the norm of the whole tensor, at most 1 after
            m, v = _ema(m, c, b1), _ema_of_squares(v, c, b2)
            # A copy: the state must not alias a gradient buffer that its owner may reuse.
            return _adam_direction(m, v, bc1, bc2_sqrt, eps), m, v, g.to(last.dtype, copy=True)

        out, mu, nu, last_grad = _tree.map_many(one, updates, state.mu, state.nu, state.last_grad, n=4)
        return out, ScaleByMarsState(count, mu, nu, last_grad)

    return GradientTransformation(init, update)


def _norm(x: Tensor) -> Tensor:
    """The Euclidean norm of a whole tensor, in at least float32 (a bf16 norm keeps ~3 digits)."""
    return torch.linalg.vector_norm(x, dtype=torch.promote_types(x.dtype, torch.float32))
