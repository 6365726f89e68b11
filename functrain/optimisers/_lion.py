"""Lion: evolved sign momentum (Chen et al., 2023)."""

from __future__ import annotations

from .. import _validate
from ..base import GradientTransformation, Hyperparameter
from ..transforms import scale_by_lion
from ..wrappers import schedulable
from ._common import descent


@schedulable
def lion(
    lr: Hyperparameter = 1e-4,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.99),
    weight_decay: Hyperparameter = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""Lion (EvoLved Sign Momentum), the update rule of Chen et al. (2023), Algorithm 2.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``):

    .. math::
        c_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \theta_t &= \theta_{t-1} - \gamma\,(\operatorname{sign}(c_t) + \lambda\theta_{t-1}) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t

    Every entry moves by exactly :math:`\gamma` (plus the decoupled decay), so Lion wants a learning
    rate 3-10x smaller than AdamW's and a weight decay 3-10x larger, as the paper advises.

    Args:
        lr: learning rate :math:`\gamma` (the paper's default 1e-4).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1]: the interpolation weight of the momentum
            in the update, and the momentum's own decay.
        weight_decay: decoupled decay :math:`\lambda`, scaled by the learning rate.
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0, 0.5])}
        >>> tx = ft.lion(lr=0.1, weight_decay=1.0)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0, 0.0])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([ 0.8000, -1.7000,  0.4500])

    References:
        Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2.
        optax's ``lion``.
    """
    beta1, beta2 = _validate.pair("lion", "betas", betas)
    _validate.in_range("lion", "lr", lr, 0.0)
    _validate.in_range("lion", "betas[0]", beta1, 0.0, 1.0)
    _validate.in_range("lion", "betas[1]", beta2, 0.0, 1.0)
    _validate.in_range("lion", "weight_decay", weight_decay, 0.0)
    return descent(
        scale_by_lion(beta1, beta2), lr=lr, maximize=maximize, weight_decay=weight_decay, decoupled_weight_decay=True
    )
