"""RMSprop, Adagrad and Adadelta: steps scaled by accumulated squared gradients."""

from __future__ import annotations

import torch

from .. import _validate
from ..base import GradientTransformation, Hyperparameter
from ..transforms import scale_by_adadelta, scale_by_rms, scale_by_rss, scale_by_stddev, trace
from ..wrappers import schedulable
from ._common import descent, nonzero


@schedulable(complex_params=True)
def rmsprop(
    lr: Hyperparameter = 1e-2,
    alpha: Hyperparameter = 0.99,
    eps: Hyperparameter = 1e-8,
    weight_decay: Hyperparameter = 0.0,
    momentum: Hyperparameter = 0.0,
    centered: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""RMSprop, numerically equal to ``torch.optim.RMSprop``.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``):

    .. math::
        g_t &\leftarrow g_t + \lambda\theta_{t-1}\\
        v_t &= \alpha v_{t-1} + (1-\alpha) g_t^2, \qquad
        \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t \quad\text{(centered only)}\\
        d_t &= g_t / (\sqrt{v_t} + \epsilon) \text{, or } g_t / (\sqrt{v_t - \bar g_t^2} + \epsilon)
               \text{ if centered}\\
        b_t &= \mu b_{t-1} + d_t \quad\text{(when } \mu > 0\text{, else } b_t = d_t)\\
        \theta_t &= \theta_{t-1} - \gamma b_t

    Args:
        lr: learning rate :math:`\gamma`.
        alpha: smoothing constant :math:`\alpha` of the squared-gradient average.
        eps: :math:`\epsilon`, added to the square root (outside it, as torch.optim).
        weight_decay: L2 penalty :math:`\lambda`, added to the gradient.
        momentum: momentum factor :math:`\mu`; 0 keeps no momentum buffer.
        centered: divide by an estimate of the gradient's variance rather than its second moment.
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.rmsprop(lr=0.01)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([ 0.9000, -1.9000])

    References:
        Hinton, Srivastava & Swersky, 2012, "Neural Networks for Machine Learning", lecture 6e.
        Graves, 2013, "Generating Sequences With Recurrent Neural Networks" (the centred form).
    """
    for name, value in (("lr", lr), ("eps", eps), ("momentum", momentum), ("weight_decay", weight_decay)):
        _validate.in_range("rmsprop", name, value, 0.0)
    _validate.in_range("rmsprop", "alpha", alpha, 0.0)  # torch.optim checks only alpha >= 0
    direction = (scale_by_stddev if centered else scale_by_rms)(alpha, eps)
    # torch.optim's buffer is `mu * b + d` with no dampening and no first-step exception: a
    # zero-initialised trace.
    momentum_tx = trace(momentum) if nonzero(momentum) else None
    return descent(direction, momentum_tx, lr=lr, maximize=maximize, weight_decay=weight_decay)


@schedulable(complex_params=True)
def adagrad(
    lr: Hyperparameter = 1e-2,
    lr_decay: Hyperparameter = 0.0,
    weight_decay: Hyperparameter = 0.0,
    initial_accumulator_value: Hyperparameter = 0.0,
    eps: Hyperparameter = 1e-10,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""Adagrad, numerically equal to ``torch.optim.Adagrad`` (dense gradients).

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``) and :math:`t` 1-based:

    .. math::
        g_t &\leftarrow g_t + \lambda\theta_{t-1}\\
        s_t &= s_{t-1} + g_t^2, \qquad s_0 = \text{initial\_accumulator\_value}\\
        \tilde\gamma_t &= \gamma / (1 + (t-1)\eta)\\
        \theta_t &= \theta_{t-1} - \tilde\gamma_t\, g_t / (\sqrt{s_t} + \epsilon)

    Args:
        lr: learning rate :math:`\gamma`.
        lr_decay: :math:`\eta`; the learning rate decays as :math:`\gamma / (1 + (t-1)\eta)`
            (applied on top of ``lr``'s own schedule, if it has one).
        weight_decay: L2 penalty :math:`\lambda`, added to the gradient.
        initial_accumulator_value: the starting value :math:`s_0` of every sum of squares.
        eps: :math:`\epsilon`, added to the square root.
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count
    (``initial_accumulator_value`` is read once, by ``init``).

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.adagrad(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([ 0.9000, -1.9000])

    References:
        Duchi, Hazan & Singer, 2011, "Adaptive Subgradient Methods for Online Learning and
        Stochastic Optimization".
    """
    for name, value in (
        ("lr", lr),
        ("lr_decay", lr_decay),
        ("weight_decay", weight_decay),
        ("initial_accumulator_value", initial_accumulator_value),
        ("eps", eps),
    ):
        _validate.in_range("adagrad", name, value, 0.0)

    def decayed_lr(count):  # torch.optim: clr = lr / (1 + (step - 1) * lr_decay), step 1-based
        return lr / (1 + count.to(torch.float64) * lr_decay)

    return descent(
        scale_by_rss(initial_accumulator_value, eps),
        lr=decayed_lr if nonzero(lr_decay) else lr,
        maximize=maximize,
        weight_decay=weight_decay,
    )


@schedulable(complex_params=True)
def adadelta(
    lr: Hyperparameter = 1.0,
    rho: Hyperparameter = 0.9,
    eps: Hyperparameter = 1e-6,
    weight_decay: Hyperparameter = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""Adadelta, numerically equal to ``torch.optim.Adadelta``.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``):

    .. math::
        g_t &\leftarrow g_t + \lambda\theta_{t-1}\\
        v_t &= \rho v_{t-1} + (1-\rho) g_t^2\\
        \Delta_t &= \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t, \qquad
        u_t = \rho u_{t-1} + (1-\rho) \Delta_t^2\\
        \theta_t &= \theta_{t-1} - \gamma \Delta_t

    Args:
        lr: coefficient :math:`\gamma` that scales :math:`\Delta_t` (1 in the paper).
        rho: decay rate :math:`\rho` of both running averages, in [0, 1].
        eps: :math:`\epsilon`, added inside both square roots.
        weight_decay: L2 penalty :math:`\lambda`, added to the gradient.
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.adadelta(lr=1.0)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([ 0.9968, -1.9968])

    References:
        Zeiler, 2012, "ADADELTA: An Adaptive Learning Rate Method".
    """
    _validate.in_range("adadelta", "lr", lr, 0.0)
    _validate.in_range("adadelta", "rho", rho, 0.0, 1.0)
    _validate.in_range("adadelta", "eps", eps, 0.0)
    _validate.in_range("adadelta", "weight_decay", weight_decay, 0.0)
    return descent(scale_by_adadelta(rho, eps), lr=lr, maximize=maximize, weight_decay=weight_decay)
