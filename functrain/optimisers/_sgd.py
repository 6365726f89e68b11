"""Stochastic gradient descent, with momentum and Nesterov momentum."""

from __future__ import annotations

from .. import _validate
from ..base import GradientTransformation, Hyperparameter
from ..transforms import trace
from ..wrappers import schedulable
from ._common import descent, nonzero


@schedulable(complex_params=True)
def sgd(
    lr: Hyperparameter = 1e-3,
    momentum: Hyperparameter = 0.0,
    dampening: Hyperparameter = 0.0,
    weight_decay: Hyperparameter = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""Stochastic gradient descent, numerically equal to ``torch.optim.SGD``.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``):

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \\
        b_t &= \mu b_{t-1} + (1 - \tau) g_t \quad (b_1 = g_1) \\
        g_t &\leftarrow g_t + \mu b_t \text{ if nesterov else } b_t \\
        \theta_t &= \theta_{t-1} - \gamma g_t

    Args:
        lr: learning rate :math:`\gamma` (float, 0-d tensor or schedule).
        momentum: momentum factor :math:`\mu`; 0 disables the momentum buffer.
        dampening: dampening :math:`\tau` of the gradient in the momentum buffer.
        weight_decay: L2 penalty :math:`\lambda`, added to the gradient.
        nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: maximise the objective instead of minimising it.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.sgd(lr=0.1, momentum=0.9)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([1.0, 1.0])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([ 0.9000, -2.1000])

    References:
        Sutskever et al., 2013, "On the importance of initialization and momentum in deep learning".
        ``torch.optim.SGD``.
    """
    _validate.in_range("sgd", "lr", lr, 0.0)
    _validate.in_range("sgd", "momentum", momentum, 0.0)
    _validate.in_range("sgd", "weight_decay", weight_decay, 0.0)
    if nesterov and not nonzero(momentum):
        raise ValueError("sgd: nesterov=True requires momentum > 0 and dampening == 0")
    if nesterov:
        # Checked by value, not by type: a 0-d tensor dampening of 0 (inject_hyperparams) is allowed.
        _validate.in_range("sgd", "momentum (with nesterov=True)", momentum, 0.0, low_open=True)
        _validate.in_range("sgd", "dampening (with nesterov=True)", dampening, 0.0, 0.0)
    momentum_tx = trace(momentum, nesterov=nesterov, dampening=dampening) if nonzero(momentum) else None
    return descent(momentum_tx, lr=lr, maximize=maximize, weight_decay=weight_decay)
