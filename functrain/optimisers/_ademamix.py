"""AdEMAMix (Pagliardini et al., 2024)."""

from __future__ import annotations

from .. import _validate
from ..base import GradientTransformation, Hyperparameter
from ..transforms import scale_by_ademamix
from ..wrappers import schedulable
from ._common import descent


@schedulable
def ademamix(
    lr: Hyperparameter = 1e-3,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.999),
    beta3: Hyperparameter = 0.9999,
    alpha: Hyperparameter = 5.0,
    t_alpha_beta3: int | None = None,
    eps: Hyperparameter = 1e-8,
    weight_decay: Hyperparameter = 0.0,
    decoupled_weight_decay: bool = True,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""AdEMAMix: Adam whose numerator mixes its fast EMA of gradients with a much slower one.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``; plus :math:`\lambda\theta`
    for the L2 penalty when ``decoupled_weight_decay=False``):

    .. math::
        m^{(1)}_t &= \beta_1 m^{(1)}_{t-1} + (1-\beta_1) g_t, \qquad
        m^{(2)}_t = \beta_3(t)\, m^{(2)}_{t-1} + (1-\beta_3(t))\, g_t, \qquad
        \nu_t = \beta_2 \nu_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \gamma\Big(\frac{m^{(1)}_t/(1-\beta_1^t) + \alpha_t m^{(2)}_t}
                    {\sqrt{\nu_t}/\sqrt{1-\beta_2^t} + \epsilon} + \lambda\theta_{t-1}\,[\text{decoupled}]\Big)

    With ``t_alpha_beta3`` :math:`= T`, the paper's warmup schedulers: :math:`\alpha_t =
    \min(t\alpha/T, \alpha)` and :math:`\beta_3(t)` whose half-life grows linearly from
    :math:`\beta_1`'s to :math:`\beta_3`'s (``ft.transforms.ademamix_alpha``/``ademamix_beta3``);
    without it, :math:`\alpha_t = \alpha` and :math:`\beta_3(t) = \beta_3`. The slow EMA
    (:math:`\beta_3 = 0.9999` averages over ~10k steps) keeps old gradients relevant, and the
    warmup keeps it from dominating while it is still mostly its zero start.

    Reference matched: ``pytorch_optimizer.AdEMAMix`` 4.1.0, which follows the paper's Algorithm 1
    and its schedulers exactly (one :math:`T` for both, as the paper's experiments use). The
    authors' code (apple/ml-ademamix) writes the same schedulers with an ``eps=1e-8`` inside the
    half-life's logarithm and takes separate ``alpha_warmup``/``beta3_warmup``. The decay default
    here is the paper's decoupled one (AdamW's; the authors' code has only that); pytorch-optimizer
    defaults to the L2 penalty (``weight_decouple=False``), ``decoupled_weight_decay=False`` here.

    Args:
        lr: learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`, the fast EMA's and the second moment's decay, each in [0, 1).
        beta3: :math:`\beta_3` in [0, 1], the slow EMA's decay (pytorch-optimizer and the authors' code
            take it as a third item of ``betas``; a pair here, as for every Adam in functrain).
        alpha: :math:`\alpha \ge 0`, the weight of the slow EMA (the paper uses 5 to 10).
        t_alpha_beta3: :math:`T`, the warmup of :math:`\alpha` and :math:`\beta_3` in steps (an int
            >= 1, typically the length of training), or ``None`` for none.
        eps: :math:`\epsilon` in the denominator.
        weight_decay: :math:`\lambda`, decoupled (default) or an L2 penalty.
        decoupled_weight_decay: decay the parameters directly (the paper's AdamW-style decay).
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.ademamix(lr=0.1, alpha=5.0, t_alpha_beta3=100)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, state, params)
        >>> updates["w"]  # Adam's first step, -lr sign(g), and a slow EMA still weighted 0.05 * 0.009
        tensor([-0.1000,  0.1000])
        >>> t = torch.tensor(50.0, dtype=torch.float64)  # halfway through the warmup
        >>> alpha_t = ft.transforms.ademamix_alpha(t, 5.0, 100)
        >>> beta3_t = ft.transforms.ademamix_beta3(t, 0.9, 0.9999, 100)
        >>> float(alpha_t), round(float(beta3_t), 4)
        (2.5, 0.9998)

    References:
        Pagliardini, Ablin & Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster, Older",
        Algorithm 1 and its schedulers (section 3).
        pytorch-optimizer 4.1.0, ``AdEMAMix``; the authors' code, github.com/apple/ml-ademamix.
    """
    beta1, beta2 = _validate.pair("ademamix", "betas", betas)
    _validate.in_range("ademamix", "lr", lr, 0.0)
    _validate.in_range("ademamix", "betas[0]", beta1, 0.0, 1.0, high_open=True)
    _validate.in_range("ademamix", "betas[1]", beta2, 0.0, 1.0, high_open=True)
    _validate.in_range("ademamix", "beta3", beta3, 0.0, 1.0)
    _validate.in_range("ademamix", "alpha", alpha, 0.0)
    _validate.in_range("ademamix", "eps", eps, 0.0)
    _validate.in_range("ademamix", "weight_decay", weight_decay, 0.0)
    if t_alpha_beta3 is not None:
        _validate.integer("ademamix", "t_alpha_beta3", t_alpha_beta3, 1)
        # The beta3 scheduler interpolates 1/log(beta): log(0) has no half-life to start from.
        _validate.in_range("ademamix", "betas[0] (with t_alpha_beta3)", beta1, 0.0, 1.0, low_open=True, high_open=True)
    return descent(
        scale_by_ademamix(beta1, beta2, beta3, alpha, t_alpha_beta3, eps),
        lr=lr,
        maximize=maximize,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
    )
