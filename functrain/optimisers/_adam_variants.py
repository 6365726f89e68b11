"""NAdam, RAdam and Adamax."""

from __future__ import annotations

from .. import _validate
from ..base import GradientTransformation, Hyperparameter
from ..transforms import scale_by_adamax, scale_by_nadam, scale_by_radam
from ..wrappers import schedulable
from ._adam import check_adam_args
from ._common import descent


@schedulable(complex_params=True)
def nadam(
    lr: Hyperparameter = 2e-3,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.999),
    eps: Hyperparameter = 1e-8,
    weight_decay: Hyperparameter = 0.0,
    momentum_decay: Hyperparameter = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""NAdam: Adam with Nesterov momentum, numerically equal to ``torch.optim.NAdam``.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``):

    .. math::
        g_t &\leftarrow g_t + \lambda\theta_{t-1} \quad\text{(unless decoupled)}\\
        \mu_t &= \beta_1\big(1 - \tfrac12\, 0.96^{t\psi}\big), \qquad
            \Pi_t = \textstyle\prod_{i \le t} \mu_i\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
        \theta_t &= \theta_{t-1} - \gamma\lambda\theta_{t-1}\,[\text{decoupled}]
            - \gamma \frac{\frac{1-\mu_t}{1-\Pi_t} g_t + \frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}} m_t}
                          {\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    Args:
        lr: learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon`, added to the denominator for numerical stability.
        weight_decay: :math:`\lambda`; an L2 penalty, or decoupled decay with ``decoupled_weight_decay=True``.
        momentum_decay: :math:`\psi`, how fast the momentum coefficient :math:`\mu_t` warms up to
            :math:`\beta_1`.
        decoupled_weight_decay: decay the weights directly, as AdamW does (NAdamW).
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count. As in
    torch.optim, :math:`\Pi_t` is kept in float32 (float64 when that is the default dtype).

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.nadam(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([ 0.8944, -1.8944])

    References:
        Dozat, 2016, "Incorporating Nesterov Momentum into Adam".
    """
    beta1, beta2 = check_adam_args("nadam", lr, betas, eps, weight_decay)
    _validate.in_range("nadam", "momentum_decay", momentum_decay, 0.0)
    return descent(
        scale_by_nadam(beta1, beta2, eps, momentum_decay),
        lr=lr,
        maximize=maximize,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
    )


@schedulable(complex_params=True)
def radam(
    lr: Hyperparameter = 1e-3,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.999),
    eps: Hyperparameter = 1e-8,
    weight_decay: Hyperparameter = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""RAdam: Adam with a rectified adaptive learning rate, numerically equal to ``torch.optim.RAdam``.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``) and :math:`m_t, v_t`
    Adam's moments:

    .. math::
        g_t &\leftarrow g_t + \lambda\theta_{t-1} \quad\text{(unless decoupled)}\\
        \rho_\infty &= \frac{2}{1-\beta_2} - 1, \qquad \rho_t = \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t}\\
        r_t &= \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}\\
        \theta_t &= \theta_{t-1} - \gamma\lambda\theta_{t-1}\,[\text{decoupled}] - \gamma\,\frac{m_t}{1-\beta_1^t}
            \cdot \begin{cases} r_t\sqrt{1-\beta_2^t}\,/\,(\sqrt{v_t}+\epsilon) & \rho_t > 5\\
                                1 & \text{otherwise (SGD with momentum)} \end{cases}

    Args:
        lr: learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon`, added to the denominator for numerical stability.
        weight_decay: :math:`\lambda`; an L2 penalty, or decoupled decay with ``decoupled_weight_decay=True``.
        decoupled_weight_decay: decay the weights directly, as AdamW does.
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count. The switch
    at :math:`\rho_t > 5` is a ``torch.where`` on the step count, so a compiled step never branches.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.radam(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]  # rho_1 = 1: an SGD-with-momentum step
        tensor([ 0.9500, -1.7000])

    References:
        Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and Beyond".
    """
    beta1, beta2 = check_adam_args("radam", lr, betas, eps, weight_decay)
    return descent(
        scale_by_radam(beta1, beta2, eps),
        lr=lr,
        maximize=maximize,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
    )


@schedulable(complex_params=True)
def adamax(
    lr: Hyperparameter = 2e-3,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.999),
    eps: Hyperparameter = 1e-8,
    weight_decay: Hyperparameter = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""Adamax: Adam with an infinity-norm second moment, numerically equal to ``torch.optim.Adamax``.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``):

    .. math::
        g_t &\leftarrow g_t + \lambda\theta_{t-1}\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon)\\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{u_t}

    Args:
        lr: learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1); :math:`\beta_2` decays the infinity norm.
        eps: :math:`\epsilon`, added to :math:`|g_t|` for numerical stability.
        weight_decay: L2 penalty :math:`\lambda`, added to the gradient.
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.adamax(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([ 0.9000, -1.9000])

    References:
        Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization", section 7.1.
    """
    beta1, beta2 = check_adam_args("adamax", lr, betas, eps, weight_decay)
    return descent(scale_by_adamax(beta1, beta2, eps), lr=lr, maximize=maximize, weight_decay=weight_decay)
