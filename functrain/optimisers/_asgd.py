"""ASGD: SGD with a decaying step size and a running (Polyak) average of the parameters."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree, _validate
from ..base import GradientTransformation, Hyperparameter, register_state, step_count
from ..combine import chain
from ..transforms import add_decayed_weights, polyak_averaging, scale
from ..wrappers import schedulable
from ._common import nonzero


@register_state
class AsgdStepSizeState(NamedTuple):
    count: Tensor  # updates done so far
    eta: Tensor  # 0-d float64: the step size of the next update (torch.optim.ASGD's ``state["eta"]``)


def _asgd_step_size(lr, lambd, alpha) -> GradientTransformation:
    """Multiplies updates by ``-eta``, ``eta_0 = lr`` and ``eta_k = lr / (1 + lambd * lr * k)**alpha``.

    torch.optim.ASGD computes the next step's ``eta`` at the end of each step from the values of
    ``lr``, ``lambd`` and ``alpha`` then; keeping it in the state (rather than recomputing it from the
    count) keeps that timing when the hyperparameters follow schedules.
    """

    def init(params):
        count = step_count(params)
        return AsgdStepSizeState(count=count, eta=torch.as_tensor(lr, dtype=torch.float64, device=count.device))

    def update(updates, state, params=None, **extra):
        out = _tree.scale(updates, -state.eta)
        count = state.count + 1
        eta = lr / (1 + lambd * lr * count.to(torch.float64)) ** alpha
        return out, AsgdStepSizeState(count=count, eta=eta)

    return GradientTransformation(init, update)


@schedulable(complex_params=True)
def asgd(
    lr: Hyperparameter = 1e-2,
    lambd: Hyperparameter = 1e-4,
    alpha: Hyperparameter = 0.75,
    t0: Hyperparameter = 1e6,
    weight_decay: Hyperparameter = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""Averaged stochastic gradient descent, numerically equal to ``torch.optim.ASGD``.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``) and :math:`t` 1-based:

    .. math::
        g_t &\leftarrow g_t + \lambda\theta_{t-1}\\
        \eta_t &= \gamma / (1 + \lambda_d \gamma (t-1))^{\alpha}\\
        \theta_t &= \theta_{t-1} - \eta_t (g_t + \lambda_d \theta_{t-1})\\
        \mu_t &= 1 / \max(1, t - 1 - t_0), \qquad
        \bar\theta_t = \bar\theta_{t-1} + \mu_t (\theta_t - \bar\theta_{t-1})

    The averaged parameters :math:`\bar\theta` (torch's ``state["ax"]``) do not affect the steps;
    they are ``state[-1].ax``, the :func:`~functrain.transforms.polyak_averaging` state, last in the
    chain (``state.inner_state[-1].ax`` when a hyperparameter follows a schedule).

    Args:
        lr: learning rate :math:`\gamma`.
        lambd: decay term :math:`\lambda_d`: it shrinks the parameters and the step size.
        alpha: power :math:`\alpha` of the step-size decay.
        t0: the step :math:`t_0` from which the parameters are averaged.
        weight_decay: L2 penalty :math:`\lambda`, added to the gradient.
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.asgd(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([ 0.9500, -1.7000])
        >>> state.inner_state[-1].ax["w"]  # before t0 the average is the latest parameters
        tensor([ 0.9500, -1.7000])

    References:
        Polyak & Juditsky, 1992, "Acceleration of Stochastic Approximation by Averaging".
        Bottou, 2012, "Stochastic Gradient Descent Tricks" (the step-size schedule).
    """
    _validate.in_range("asgd", "lr", lr, 0.0)
    _validate.in_range("asgd", "lambd", lambd, 0.0)
    # torch.optim.ASGD checks neither: a negative power would grow the step size without bound,
    # and a NaN t0 would never start (or never stop) the averaging, silently.
    _validate.in_range("asgd", "alpha", alpha, 0.0)
    _validate.in_range("asgd", "t0", t0, 0.0)
    _validate.in_range("asgd", "weight_decay", weight_decay, 0.0)
    parts = [
        scale(-1.0) if maximize else None,
        add_decayed_weights(weight_decay) if nonzero(weight_decay) else None,
        add_decayed_weights(lambd) if nonzero(lambd) else None,
        _asgd_step_size(lr, lambd, alpha),
        polyak_averaging(t0),
    ]
    return chain(*(p for p in parts if p is not None))
