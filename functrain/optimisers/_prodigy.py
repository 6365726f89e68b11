"""Prodigy: Adam with a learning-rate-free step size, equal to ``prodigyopt.Prodigy``."""

from __future__ import annotations

from .. import _validate
from ..base import GradientTransformation, Hyperparameter
from ..combine import chain
from ..transforms import add_decayed_weights, scale_by_prodigy
from ..wrappers import schedulable
from ._common import nonzero


def check_lr_free_args(owner: str, lr, betas, eps, weight_decay, d0, growth_rate) -> tuple:
    """The checks Prodigy and D-Adaptation share (the packages', and ranges they leave unchecked);
    returns ``(beta1, beta2)``. ``lr`` may be 0 (a schedule's warm-up start): that step is skipped."""
    beta1, beta2 = _validate.pair(owner, "betas", betas)
    _validate.in_range(owner, "lr", lr, 0.0)
    _validate.in_range(owner, "betas[0]", beta1, 0.0, 1.0, high_open=True)
    _validate.in_range(owner, "betas[1]", beta2, 0.0, 1.0, high_open=True)
    _validate.in_range(owner, "eps", eps, 0.0, low_open=True)
    _validate.in_range(owner, "weight_decay", weight_decay, 0.0)
    _validate.in_range(owner, "d0", d0, 0.0, low_open=True)
    _validate.in_range(owner, "growth_rate", growth_rate, 0.0, low_open=True)
    return beta1, beta2


@schedulable
def prodigy(
    lr: Hyperparameter = 1.0,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.999),
    beta3: Hyperparameter | None = None,
    eps: Hyperparameter = 1e-8,
    weight_decay: Hyperparameter = 0.0,
    decouple: bool = True,
    use_bias_correction: bool = False,
    safeguard_warmup: bool = False,
    d0: Hyperparameter = 1e-6,
    d_coef: Hyperparameter = 1.0,
    growth_rate: Hyperparameter = float("inf"),
    slice_p: int = 1,
) -> GradientTransformation:
    r"""Prodigy, numerically equal to ``prodigyopt.Prodigy`` (1.1.2): Adam whose step size :math:`d`
    is estimated as it goes, from :math:`d_0` up towards the distance to the solution. Leave ``lr``
    at 1 unless training is unstable.

    Update rule, with :math:`g` the gradient (plus :math:`\lambda\theta` when not ``decouple``),
    :math:`\hat\gamma_k = d_k\gamma\rho_k` (:math:`\rho_k = \sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})`
    with ``use_bias_correction``, else 1), :math:`\tilde x` every ``slice_p``-th element of
    :math:`x` and every sum over all parameters:

    .. math::
        m &\leftarrow \beta_1 m + d_k(1-\beta_1) g, \qquad v \leftarrow \beta_2 v + d_k^2(1-\beta_2) g^2\\
        s &\leftarrow \beta_3 s + \tfrac{d_k}{d_0}\hat\gamma_k \tilde g \quad
            (\tfrac{d_k}{d_0} d_k \tilde g \text{ with safeguard\_warmup})\\
        r_{k+1} &= \beta_3 r_k + \tfrac{d_k}{d_0}\hat\gamma_k\langle \tilde g, \tilde\theta_0 - \tilde\theta\rangle,
            \qquad \hat d = c\, r_{k+1} / \lVert s\rVert_1\\
        d_{k+1} &= \min\big(\max(d^{\max}_k, \hat d),\ \eta\,(\max(d_k, \hat d) \text{ while } d_k = d_0
            \text{, else } d_k)\big)\\
        \theta &\leftarrow \theta - \hat\gamma_k\lambda\theta\,[\text{decouple}]
            - \hat\gamma_k \frac{m}{\sqrt{v} + d_{k+1}\epsilon}

    (:math:`\beta_1 = 0` steps along :math:`d_{k+1} g` instead of :math:`m`). A step where
    :math:`\lVert s\rVert_1 = 0` (no gradient signal yet, or :math:`\gamma = 0`) moves nothing and
    keeps :math:`k, d, r`, as the package returns early.

    Differences from the package, none of them numerical:

    - One parameter group. The package's :math:`d` is one estimate over all its groups too; for
      per-group weight decay or frozen parts, use ``ft.partition`` (each part then estimates its
      own :math:`d`) or ``ft.masked``.
    - ``fsdp_in_use`` is gone: the estimate's sums always run over the whole tree, and over every
      shard of a sharded (DTensor) parameter, so a sharded step equals one process's
      (``make_train_step(mesh=...)``) with nothing to switch on.
    - ``lr`` may be a float, a 0-d tensor or a schedule of the step count: the package's
      ``group['lr']`` set by a scheduler before each step. ``lr = 0`` is accepted (a warm-up's first
      step), and skips the step, as the package does when a scheduler sets a group's lr to 0.
    - With ``slice_p = 1`` the state's ``s`` and ``p0`` keep each parameter's shape (the package
      flattens them), and ``p0`` is kept even for an all-zero parameter (the package stores a scalar
      0 there; the numbers are the same). ``exp_avg`` is kept even with ``beta1 = 0``.

    Args:
        lr: :math:`\gamma`, a multiplier of the estimated step size, ``>= 0``.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        beta3: :math:`\beta_3` in [0, 1), the decay of the estimate's sums; None for :math:`\sqrt{\beta_2}`.
        eps: :math:`\epsilon > 0`, scaled by :math:`d` in the denominator.
        weight_decay: :math:`\lambda \ge 0`.
        decouple: decoupled (AdamW-style) decay; else an L2 penalty in the gradient.
        use_bias_correction: Adam's bias correction in the step size.
        safeguard_warmup: leave :math:`\gamma` out of :math:`s` (for learning-rate warm-up).
        d0: :math:`d_0 > 0`, the initial estimate.
        d_coef: :math:`c > 0`, the estimate's coefficient: the preferred knob to tune.
        growth_rate: :math:`\eta > 0`, the largest factor by which :math:`d` grows per step (inf: unbounded).
        slice_p: an int ``>= 1``: estimate from every ``slice_p``-th element only, for memory.

    Every float argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.prodigy()
        >>> state = tx.init(params)
        >>> for _ in range(200):  # minimise |w - (3, 1)|^2 / 2
        ...     updates, state = tx.update({"w": params["w"] - torch.tensor([3.0, 1.0])}, state, params)
        ...     params = ft.apply_updates(params, updates)
        >>> params["w"].round(decimals=3), round(float(state.inner_state[-1].d), 3)  # d grew from d0 = 1e-6
        (tensor([3., 1.]), 1.092)

    References:
        Mishchenko & Defazio, 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner",
        https://arxiv.org/abs/2306.06101. Reference implementation: ``prodigyopt`` 1.1.2
        (https://github.com/konstmish/prodigy).
    """
    beta1, beta2 = check_lr_free_args("prodigy", lr, betas, eps, weight_decay, d0, growth_rate)
    if beta3 is not None:
        _validate.in_range("prodigy", "beta3", beta3, 0.0, 1.0, high_open=True)
    _validate.in_range("prodigy", "d_coef", d_coef, 0.0, low_open=True)
    slice_p = _validate.integer("prodigy", "slice_p", slice_p, 1)
    core = scale_by_prodigy(
        lr,
        (beta1, beta2),
        beta3,
        eps,
        weight_decay if decouple else 0.0,
        use_bias_correction,
        safeguard_warmup,
        d0,
        d_coef,
        growth_rate,
        slice_p,
    )
    if decouple or not nonzero(weight_decay):
        return chain(core)
    return chain(add_decayed_weights(weight_decay), core)
