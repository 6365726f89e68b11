"""Schedule-free AdamW (Defazio et al., 2024), equal to ``schedulefree.AdamWScheduleFree``."""

from __future__ import annotations

import torch

from .. import _tree, _validate
from ..base import GradientTransformation, Hyperparameter, OptState, Params
from ..combine import chain
from ..transforms import (
    ScaleByScheduleFreeState,
    add_decayed_weights,
    scale_by_bias_corrected_rms,
    scale_by_schedule_free,
)
from ..wrappers import schedulable
from ._common import nonzero


@schedulable
def schedule_free_adamw(
    lr: Hyperparameter = 0.0025,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.999),
    eps: Hyperparameter = 1e-8,
    weight_decay: Hyperparameter = 0.0,
    warmup_steps: int = 0,
    r: Hyperparameter = 0.0,
    weight_lr_power: Hyperparameter = 2.0,
) -> GradientTransformation:
    r"""Schedule-free AdamW, numerically equal to ``schedulefree.AdamWScheduleFree`` in train mode.

    The params are :math:`y`, the point where gradients are taken; the state holds the base
    sequence :math:`z` (initially the params); the average :math:`x`, the point to evaluate and
    save, is ``schedule_free_eval_params(params, state)``. With :math:`t` the 1-based step and
    :math:`\gamma_t = \gamma\min(1, t/\text{warmup\_steps})`:

    .. math::
        v_t &= \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \qquad
        u_t = \frac{g_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} + \lambda y_{t-1} \\
        c_t &= \frac{w_t}{\sum_{i\le t} w_i}, \qquad w_t = t^r \big(\max_{i\le t}\gamma_i\big)^p \\
        z_t &= z_{t-1} - \gamma_t u_t, \qquad x_t = (1-c_t)\,x_{t-1} + c_t z_t, \qquad
        y_t = (1-\beta_1) z_t + \beta_1 x_t

    computed, as the package does, without storing :math:`x`:
    :math:`y_t = y_{t-1} + c_t(z_{t-1} - y_{t-1}) + \gamma_t(\beta_1(1-c_t) - 1)\,u_t`.
    Weight decay is taken at :math:`y` and goes through the averaging. No learning-rate schedule
    is needed (only the warmup); a schedule passed as ``lr`` still works.

    Args:
        lr: learning rate :math:`\gamma` (after warmup).
        betas: :math:`(\beta_1, \beta_2)`: the interpolation :math:`\beta_1` in (0, 1) between
            :math:`z` and :math:`x` (0 would leave :math:`x` unrecoverable from :math:`y, z`) and
            the second-moment decay :math:`\beta_2` in [0, 1).
        eps: :math:`\epsilon`, added to the denominator outside the square root.
        weight_decay: :math:`\lambda`, decay evaluated at :math:`y`.
        warmup_steps: linear warmup of the learning rate over this many steps (an int >= 0).
        r: power :math:`r \ge 0` of the step in the averaging weights (0: uniform in the step).
        weight_lr_power: power :math:`p \ge 0` of the largest learning rate so far in the
            averaging weights, so steps taken during warmup count less.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.schedule_free_adamw(lr=0.1)
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, state, params)
        ...     params = ft.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.8450, -1.8450])
        >>> ft.schedule_free_eval_params(params, state)["w"]
        tensor([ 0.8500, -1.8500])

    References:
        Defazio et al., 2024, "The Road Less Scheduled". The ``schedulefree`` package's
        ``AdamWScheduleFree``.
    """
    owner = "schedule_free_adamw"
    beta1, beta2 = _validate.pair(owner, "betas", betas)
    _validate.in_range(owner, "lr", lr, 0.0)
    _validate.in_range(owner, "betas[0]", beta1, 0.0, 1.0, low_open=True, high_open=True)
    _validate.in_range(owner, "betas[1]", beta2, 0.0, 1.0, high_open=True)
    _validate.in_range(owner, "eps", eps, 0.0)
    _validate.in_range(owner, "weight_decay", weight_decay, 0.0)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
        raise ValueError(f"{owner}: warmup_steps must be an int >= 0, got {warmup_steps!r}")
    _validate.in_range(owner, "warmup_steps", warmup_steps, 0.0)
    _validate.in_range(owner, "r", r, 0.0)
    _validate.in_range(owner, "weight_lr_power", weight_lr_power, 0.0)
    parts = [
        scale_by_bias_corrected_rms(beta2, eps),
        add_decayed_weights(weight_decay) if nonzero(weight_decay) else None,
        scale_by_schedule_free(lr, beta1, warmup_steps, r, weight_lr_power),
    ]
    return chain(*(p for p in parts if p is not None))


def schedule_free_eval_params(params: Params, opt_state: OptState) -> Params:
    r"""The averaged point :math:`x = y + (1 - 1/\beta_1)(z - y)` to evaluate and save with.

    ``params`` are the training params (:math:`y`) and ``opt_state`` the state of
    :func:`schedule_free_adamw` (or any state holding one ``scale_by_schedule_free`` state, e.g.
    inside ``inject_hyperparams``). This is what ``AdamWScheduleFree.eval()`` writes into the
    model's parameters; nothing is modified here, and training continues from ``params``.
    """
    found = next(iter(_tree.find_states(opt_state, ScaleByScheduleFreeState)), None)
    if found is None:
        raise ValueError("schedule_free_eval_params: opt_state holds no schedule-free state")
    weight = 1 - 1 / found.b1  # the package's lerp weight, 0-d float64
    return _tree.map(lambda y, z: torch.lerp(y, z, weight.to(device=y.device, dtype=y.dtype)), params, found.z)
