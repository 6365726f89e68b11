"""MARS-AdamW (Yuan et al., 2024)."""

from __future__ import annotations

from .. import _validate
from ..base import GradientTransformation, Hyperparameter
from ..combine import chain, masked
from ..transforms import scale_by_adam, scale_by_mars
from ..wrappers import schedulable
from ._common import descent


@schedulable
def mars(
    lr: Hyperparameter = 3e-3,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.95, 0.99),
    gamma: Hyperparameter = 0.025,
    optimize_1d: bool = False,
    lr_1d: Hyperparameter = 3e-3,
    betas_1d: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.95),
    weight_decay: Hyperparameter = 0.0,
    weight_decay_1d: Hyperparameter = 0.1,
    eps: Hyperparameter = 1e-8,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""MARS-AdamW: AdamW on a variance-reduced gradient, the correction from the last two gradients.

    Update rule for a parameter with at least two dimensions (every parameter with
    ``optimize_1d=True``), with :math:`g_t` the gradient (negated when ``maximize``) and
    :math:`g_0 = 0`:

    .. math::
        \tilde c_t &= g_t + \gamma\frac{\beta_1}{1-\beta_1}(g_t - g_{t-1}), \qquad
        c_t = \tilde c_t / \max(1, \lVert\tilde c_t\rVert_2) \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) c_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) c_t^2 \\
        \theta_t &= \theta_{t-1} - \gamma_{\mathrm{lr}}\Big(\frac{m_t/(1-\beta_1^t)}
                    {\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon} + \lambda\theta_{t-1}\Big)

    with the norm over the whole tensor. With ``optimize_1d=False`` (the default) vectors and
    scalars (biases, norm gains) take plain AdamW instead, with ``lr_1d``, ``betas_1d`` and
    ``weight_decay_1d`` (:math:`c_t = g_t`, no correction). The weight decay is decoupled, as in the
    paper; it is multiplied by the learning rate.

    :math:`g_{t-1}` is the previous step's gradient, on the previous batch: the paper's approximate
    MARS, which the authors' code runs by default (``is_approx=True``) and the only form
    pytorch-optimizer has. Exact MARS takes the gradient at :math:`\theta_{t-1}` on the *current*
    batch, which costs a second backward pass per step, and is not offered here.

    Reference matched: ``pytorch_optimizer.MARS`` 4.1.0 with ``mars_type="adamw"`` (its default),
    which is the authors' MARS-AdamW (github.com/AGI-Arena/MARS) but for two details. It adds
    ``1e-15`` to :math:`v_t` inside the square root (the authors' code does not, nor does this: a
    difference of order :math:`10^{-15}/v_t`, invisible unless :math:`v_t` is that small); and its
    ``weight_decouple=False`` adds the L2 term to the gradient only *after* the update is computed,
    so it reaches nothing but the stored :math:`g_{t-1}`: only the decoupled decay is offered. One
    difference in the interface: the reference derives the vectors' rate as ``lr * (lr_1d / lr)``
    from the group's current ``lr``, so an lr scheduler moves both; here ``lr_1d`` is a
    hyperparameter of its own: to schedule both, pass a schedule for each.

    Args:
        lr: learning rate :math:`\gamma_{\mathrm{lr}}` of the MARS parameters.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        gamma: :math:`\gamma \ge 0`, the strength of the gradient correction (0 gives AdamW with
            the gradient's norm clipped to 1 per tensor).
        optimize_1d: step vectors and scalars with MARS too (default: AdamW for them).
        lr_1d: learning rate of the AdamW for vectors and scalars.
        betas_1d: :math:`(\beta_1, \beta_2)` of that AdamW.
        weight_decay: decoupled decay :math:`\lambda` of the MARS parameters.
        weight_decay_1d: decoupled decay of the vectors and scalars.
        eps: :math:`\epsilon` in both denominators.
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([[0.3, -0.1]]), "b": torch.tensor([1.0])}
        >>> tx = ft.mars(lr=0.1, weight_decay_1d=0.0)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([[0.5, -3.0]]), "b": torch.tensor([2.0])}, state, params)
        >>> updates["w"], updates["b"]  # the first step of an Adam: -lr sign(g); b takes lr_1d = 3e-3
        (tensor([[-0.1000,  0.1000]]), tensor([-0.0030]))

    References:
        Yuan, Liu, Wu, Gu, Zhou, Lu & Xu, 2024, "MARS: Unleashing the Power of Variance Reduction
        for Training Large Models", Algorithm 2 (MARS-AdamW) and its approximate variant.
        pytorch-optimizer 4.1.0, ``MARS``; the authors' code, github.com/AGI-Arena/MARS.
    """
    beta1, beta2 = _validate.pair("mars", "betas", betas)
    beta1_1d, beta2_1d = _validate.pair("mars", "betas_1d", betas_1d)
    _validate.in_range("mars", "lr", lr, 0.0)
    _validate.in_range("mars", "lr_1d", lr_1d, 0.0)
    for name, value in (("betas[0]", beta1), ("betas[1]", beta2), ("betas_1d[0]", beta1_1d), ("betas_1d[1]", beta2_1d)):
        _validate.in_range("mars", name, value, 0.0, 1.0, high_open=True)
    _validate.in_range("mars", "gamma", gamma, 0.0)
    _validate.in_range("mars", "weight_decay", weight_decay, 0.0)
    _validate.in_range("mars", "weight_decay_1d", weight_decay_1d, 0.0)
    _validate.in_range("mars", "eps", eps, 0.0)

    def adamw_like(direction, rate, decay):
        return descent(direction, lr=rate, maximize=maximize, weight_decay=decay, decoupled_weight_decay=True)

    matrices = adamw_like(scale_by_mars(beta1, beta2, gamma, eps), lr, weight_decay)
    if optimize_1d:
        return matrices
    vectors = adamw_like(scale_by_adam(beta1_1d, beta2_1d, eps), lr_1d, weight_decay_1d)
    # Two masks, not a partition: a model may have no vectors (or no matrices) at all.
    return chain(masked(matrices, lambda name, p: p.ndim >= 2), masked(vectors, lambda name, p: p.ndim < 2))
