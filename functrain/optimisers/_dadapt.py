"""D-Adaptation: Adam with a learning-rate-free step size, equal to ``dadaptation.DAdaptAdam``."""

from __future__ import annotations

from ..base import GradientTransformation, Hyperparameter
from ..combine import chain
from ..transforms import add_decayed_weights, scale_by_dadapt_adam
from ..wrappers import schedulable
from ._common import nonzero
from ._prodigy import check_lr_free_args


@schedulable
def dadapt_adam(
    lr: Hyperparameter = 1.0,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.999),
    eps: Hyperparameter = 1e-8,
    weight_decay: Hyperparameter = 0.0,
    decouple: bool = False,
    use_bias_correction: bool = False,
    d0: Hyperparameter = 1e-6,
    growth_rate: Hyperparameter = float("inf"),
) -> GradientTransformation:
    r"""D-Adapted Adam, numerically equal to ``dadaptation.DAdaptAdam`` (3.2): Adam whose step size
    :math:`d` is a lower bound on the distance to the solution, estimated as it goes from
    :math:`d_0`. Leave ``lr`` at 1 unless training is unstable.

    Update rule, with :math:`g` the gradient (plus :math:`\lambda\theta` when not ``decouple``),
    :math:`\hat\gamma_k = d_k\gamma\rho_k` (:math:`\rho_k = \sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})`
    with ``use_bias_correction``, else 1) and every sum over all parameters:

    .. math::
        r_{k+1} &= \sqrt{\beta_2}\, r_k + (1-\sqrt{\beta_2})\,\hat\gamma_k
            \Big\langle g, \frac{s}{\sqrt{v}+\epsilon}\Big\rangle \quad(s, v \text{ before this step})\\
        m &\leftarrow \beta_1 m + \hat\gamma_k(1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
            \quad s \leftarrow \sqrt{\beta_2}\, s + \hat\gamma_k(1-\sqrt{\beta_2}) g\\
        \hat d &= \frac{r_{k+1}}{(1-\sqrt{\beta_2})\lVert s\rVert_1}, \qquad
            d_{k+1} = \max\big(d_k, \min(\hat d, \eta\, d_k)\big)\\
        \theta &\leftarrow \theta - \hat\gamma_k\lambda\theta\,[\text{decouple}] - \frac{m}{\sqrt{v}+\epsilon}

    The first moment carries the step size :math:`\hat\gamma_k` of each step. A step where
    :math:`\lVert s\rVert_1 = 0` (no gradient signal yet, or :math:`\gamma = 0`) moves nothing and
    keeps :math:`k, d, r`, as the package returns early.

    Differences from the package, none of them numerical:

    - One parameter group, so no ``layer_scale`` (the package's per-group factor inside the
      estimate). The package's :math:`d` is one estimate over all its groups too; for per-group
      weight decay or frozen parts, use ``ft.partition`` (each part then estimates its own :math:`d`)
      or ``ft.masked``.
    - ``fsdp_in_use`` is gone: the estimate's sums always run over the whole tree, and over every
      shard of a sharded (DTensor) parameter, so a sharded step equals one process's
      (``make_train_step(mesh=...)``) with nothing to switch on.
    - ``log_every`` is gone: the optimiser does no logging. The estimate is in the state
      (``state.inner_state[-1].d``) to log as a tensor.
    - ``lr`` may be a float, a 0-d tensor or a schedule of the step count: the package's
      ``group['lr']`` set by a scheduler before each step. ``lr = 0`` is accepted (a warm-up's first
      step), and skips the step, as the package does when a scheduler sets a group's lr to 0.

    Args:
        lr: :math:`\gamma`, a multiplier of the estimated step size, ``>= 0``.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon > 0` in the denominator.
        weight_decay: :math:`\lambda \ge 0`.
        decouple: decoupled (AdamW-style) decay; else an L2 penalty in the gradient.
        use_bias_correction: Adam's bias correction in the step size.
        d0: :math:`d_0 > 0`, the initial estimate.
        growth_rate: :math:`\eta > 0`, the largest factor by which :math:`d` grows per step (inf: unbounded).

    Every float argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.dadapt_adam()
        >>> state = tx.init(params)
        >>> for _ in range(200):  # minimise |w - (3, 1)|^2 / 2
        ...     updates, state = tx.update({"w": params["w"] - torch.tensor([3.0, 1.0])}, state, params)
        ...     params = ft.apply_updates(params, updates)
        >>> params["w"].round(decimals=3), round(float(state.inner_state[-1].d), 3)  # d grew from d0 = 1e-6
        (tensor([3., 1.]), 6.834)

    References:
        Defazio & Mishchenko, 2023, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023,
        https://arxiv.org/abs/2301.07733. Reference implementation: ``dadaptation`` 3.2
        (https://github.com/facebookresearch/dadaptation).
    """
    beta1, beta2 = check_lr_free_args("dadapt_adam", lr, betas, eps, weight_decay, d0, growth_rate)
    core = scale_by_dadapt_adam(
        lr, (beta1, beta2), eps, weight_decay if decouple else 0.0, use_bias_correction, d0, growth_rate
    )
    if decouple or not nonzero(weight_decay):
        return chain(core)
    return chain(add_decayed_weights(weight_decay), core)
