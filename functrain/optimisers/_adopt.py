"""ADOPT (Taniguchi et al., 2024)."""

from __future__ import annotations

from .. import _validate
from ..base import GradientTransformation, Hyperparameter
from ..transforms import scale_by_adopt
from ..wrappers import schedulable
from ._common import descent


@schedulable
def adopt(
    lr: Hyperparameter = 1e-3,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.9999),
    eps: Hyperparameter = 1e-6,
    clip_exp: Hyperparameter | None = 0.25,
    weight_decay: Hyperparameter = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""ADOPT: Adam with the gradient normalised by the *previous* second moment, then averaged.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``, plus :math:`\lambda\theta`
    for the L2 penalty unless decoupled), the first step :math:`t = 0` only initialising :math:`v`:

    .. math::
        v_0 &= g_0^2 \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,
               \mathrm{clip}\Big(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)},\ t^{p}\Big) \\
        \theta_t &= \theta_{t-1} - \gamma\,(m_t + \lambda\theta_{t-1}\,[\text{decoupled}]) \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2) g_t^2

    where :math:`\mathrm{clip}(x, c)` bounds each element to :math:`[-c, c]`, :math:`p` =
    ``clip_exp``. Because :math:`v_{t-1}` does not contain :math:`g_t`, the normalised gradient is
    an unbiased direction, which is what makes ADOPT converge for any :math:`\beta_2`; the clip
    bounds the first steps, where :math:`v` rests on few gradients.

    Reference matched: ``pytorch_optimizer.ADOPT`` 4.1.0 with its clip set to the paper's schedule.
    The paper (Algorithm 2 with its clipped variant) and the authors' code (iShohei220/adopt, which
    timm's ``Adopt`` copies) clip the first update with :math:`c_1 = 1^{1/4}`: the official
    ``clip_lambda(step)`` reads the number of steps done *before* the current one. pytorch-optimizer
    passes the 1-based step count, so its first clip is :math:`2^{1/4}`, a departure from the paper
    followed here by neither. In one other point this follows pytorch-optimizer, where the paper is
    silent: decoupled weight decay also shrinks the parameters on the first step (the authors' code
    and timm skip it there, which makes a factor :math:`1 - \gamma\lambda` of difference).

    Args:
        lr: learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1); the paper's default :math:`\beta_2` is 0.9999.
        eps: :math:`\epsilon`, the floor of :math:`\sqrt{v}` (ADOPT's default 1e-6).
        clip_exp: the exponent :math:`p` of the clipping bound :math:`t^p` (the authors' 0.25;
            timm's default is 0.333), ``>= 0``; ``None`` for no clipping.
        weight_decay: :math:`\lambda`; an L2 penalty added to the gradient, or decoupled decay with
            ``decoupled_weight_decay=True``.
        decoupled_weight_decay: decay the parameters directly, as AdamW does.
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.adopt(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, state, params)
        >>> updates["w"]  # the first step only records the gradient's square
        tensor([-0., -0.])
        >>> updates, state = tx.update({"w": torch.tensor([1.0, 3.0])}, state, params)
        >>> updates["w"]  # -lr (1 - b1) clip(g / |g_0|, 1)
        tensor([-0.0100, -0.0100])

    References:
        Taniguchi et al., 2024, "ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal
        Rate" (NeurIPS 2024), Algorithm 2 and the clipped variant of its section 4.
        pytorch-optimizer 4.1.0, ``ADOPT``; the authors' code, github.com/iShohei220/adopt.
    """
    beta1, beta2 = _validate.pair("adopt", "betas", betas)
    _validate.in_range("adopt", "lr", lr, 0.0)
    _validate.in_range("adopt", "betas[0]", beta1, 0.0, 1.0, high_open=True)
    _validate.in_range("adopt", "betas[1]", beta2, 0.0, 1.0, high_open=True)
    _validate.in_range("adopt", "eps", eps, 0.0)
    if clip_exp is not None:
        _validate.in_range("adopt", "clip_exp", clip_exp, 0.0)
    _validate.in_range("adopt", "weight_decay", weight_decay, 0.0)
    return descent(
        scale_by_adopt(beta1, beta2, eps, clip_exp),
        lr=lr,
        maximize=maximize,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
    )
