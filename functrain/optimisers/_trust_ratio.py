"""Layer-wise adaptive large-batch optimisers: LAMB and LARS."""

from __future__ import annotations

from .. import _validate
from ..base import GradientTransformation, Hyperparameter
from ..combine import chain
from ..transforms import add_decayed_weights, scale_by_adam, scale_by_trust_ratio, trace
from ..wrappers import schedulable
from ._adam import check_adam_args
from ._common import descent, nonzero


@schedulable
def lamb(
    lr: Hyperparameter = 1e-3,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.999),
    eps: Hyperparameter = 1e-6,
    weight_decay: Hyperparameter = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""LAMB (You et al., 2020), composed as optax's ``lamb``: Adam's direction plus decoupled decay,
    rescaled per parameter tensor by the trust ratio.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``):

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        u_t &= \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} + \lambda\theta_{t-1} \\
        \theta_t &= \theta_{t-1} - \gamma\,\frac{\lVert\theta_{t-1}\rVert}{\lVert u_t\rVert}\,u_t

    with the norms taken over each parameter tensor, and the ratio taken as 1 when either norm is 0
    (as optax does). :math:`\epsilon` sits outside the square root, as in torch.optim.Adam and
    the paper; optax's ``eps`` is placed the same way.

    Args:
        lr: learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon` in the Adam denominator (optax's default 1e-6).
        weight_decay: decoupled decay :math:`\lambda`, added to the Adam direction before the
            trust ratio is taken.
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([3.0, -4.0])}
        >>> tx = ft.lamb(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([ 2.6464, -3.6464])

    References:
        You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
        Algorithm 2. optax's ``lamb``.
    """
    beta1, beta2 = check_adam_args("lamb", lr, betas, eps, weight_decay)
    decay = add_decayed_weights(weight_decay) if nonzero(weight_decay) else None
    return descent(scale_by_adam(beta1, beta2, eps), decay, scale_by_trust_ratio(), lr=lr, maximize=maximize)


@schedulable
def lars(
    lr: Hyperparameter = 1.0,
    weight_decay: Hyperparameter = 0.0,
    momentum: Hyperparameter = 0.9,
    nesterov: bool = False,
    trust_coefficient: Hyperparameter = 0.001,
    eps: Hyperparameter = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""LARS (You et al., 2017), composed as optax's ``lars``: SGD with momentum whose step for each
    parameter tensor is scaled by a local, layer-wise learning rate.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``):

    .. math::
        u_t &= g_t + \lambda\theta_{t-1}, \qquad
        \eta_t = \frac{\eta\,\lVert\theta_{t-1}\rVert}{\lVert u_t\rVert + \epsilon} \\
        b_t &= \mu b_{t-1} + \gamma\,\eta_t u_t \quad (b_0 = 0) \\
        \theta_t &= \theta_{t-1} - (\gamma\,\eta_t u_t + \mu b_t \text{ if nesterov else } b_t)

    with the norms taken over each parameter tensor and :math:`\eta_t = 1` when either norm is 0 (as
    optax does: zero-initialised tensors take a plain SGD step). The momentum accumulates steps
    already scaled by the (possibly scheduled) learning rate, as in the paper's Algorithm 1.

    Args:
        lr: global learning rate :math:`\gamma`. optax has no default; 1.0 is chosen so that
            ``trust_coefficient`` alone bounds the relative change of each layer's weights per
            step (by :math:`\eta`, ignoring momentum), which is how the paper reads :math:`\eta`.
            Scale it with the batch size (the paper, and e.g. SimCLR's 0.3 x batch / 256).
        weight_decay: L2 penalty :math:`\lambda`, added to the gradient before the ratio is taken.
        momentum: momentum :math:`\mu`; 0 disables the buffer.
        nesterov: use Nesterov momentum.
        trust_coefficient: :math:`\eta`, the paper's trust coefficient (its default 0.001).
        eps: :math:`\epsilon`, added to the update's norm.
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([3.0, -4.0])}
        >>> tx = ft.lars(lr=1.0, trust_coefficient=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.6, -0.8])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([ 2.7000, -3.6000])

    References:
        You et al., 2017, "Large Batch Training of Convolutional Networks", Algorithm 1.
        optax's ``lars``.
    """
    _validate.in_range("lars", "lr", lr, 0.0)
    _validate.in_range("lars", "weight_decay", weight_decay, 0.0)
    _validate.in_range("lars", "momentum", momentum, 0.0)
    _validate.in_range("lars", "trust_coefficient", trust_coefficient, 0.0)
    _validate.in_range("lars", "eps", eps, 0.0)
    # optax's order: decay, trust ratio, learning rate, and only then momentum, so the buffer holds
    # steps (a schedule of lr changes new steps, not the accumulated ones).
    layerwise_step = descent(
        scale_by_trust_ratio(trust_coefficient, eps), lr=lr, maximize=maximize, weight_decay=weight_decay
    )
    momentum_tx = trace(momentum, nesterov=nesterov) if nonzero(momentum) else None
    return chain(layerwise_step, momentum_tx) if momentum_tx is not None else layerwise_step
