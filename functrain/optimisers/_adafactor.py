"""Adafactor."""

from __future__ import annotations

from .. import _validate
from ..base import GradientTransformation, Hyperparameter, value_at
from ..transforms import scale_by_factored_rms
from ..wrappers import schedulable
from ._common import descent, nonzero


@schedulable
def adafactor(
    lr: Hyperparameter = 1e-2,
    beta2_decay: Hyperparameter = -0.8,
    eps: tuple[Hyperparameter | None, Hyperparameter] = (None, 1e-3),
    d: Hyperparameter = 1.0,
    weight_decay: Hyperparameter = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""Adafactor, numerically equal to ``torch.optim.Adafactor``.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``), :math:`t` the 1-based
    step, :math:`(\epsilon_1, \epsilon_2)` = ``eps`` and :math:`\hat\beta_{2,t} = 1 - t^{c}` with
    :math:`c` = ``beta2_decay``. A tensor with two or more dims keeps a row and a column factor over
    its last two dims; a 0-d or 1-D tensor keeps a full :math:`V_t`:

    .. math::
        R_t &= \hat\beta_{2,t} R_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{-1}(g_t^2), \qquad
        C_t = \hat\beta_{2,t} C_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{-2}(g_t^2)\\
        \hat V_t &= R_t C_t / \max(\mathrm{mean}_{-2}(R_t), \epsilon_1)
            \quad\text{(or } V_t = \hat\beta_{2,t} V_{t-1} + (1-\hat\beta_{2,t}) g_t^2\text{)}\\
        U_t &= g_t / \sqrt{\max(\hat V_t, \epsilon_1^2)}, \qquad
        \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\min(\gamma, 1/\sqrt t)\\
        \theta_t &= \theta_{t-1} - \gamma\lambda\theta_{t-1} - \alpha_t\, U_t / \max(1, \mathrm{RMS}(U_t)/d)

    The learning rate :math:`\gamma` caps the relative step size and scales the (decoupled) weight
    decay, exactly as in torch.optim; the step itself is not multiplied by :math:`\gamma` again.

    Args:
        lr: learning rate :math:`\gamma`: the largest relative step size.
        beta2_decay: :math:`c \le 0`, the exponent of the second-moment decay schedule.
        eps: :math:`(\epsilon_1, \epsilon_2)`: :math:`\epsilon_1` floors the variance estimate (None:
            the machine epsilon of each parameter's dtype), :math:`\epsilon_2` floors the
            parameter's RMS in the step size.
        d: clipping threshold :math:`d \ge 1` on the RMS of the unscaled update.
        weight_decay: decoupled decay :math:`\lambda`, applied as :math:`\theta \leftarrow (1-\gamma\lambda)\theta`.
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]])}
        >>> tx = ft.adafactor(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([[0.5, -3.0], [1.0, 1.0]])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([[ 0.9264, -1.8439],
                [ 0.1835,  2.8881]])

    References:
        Shazeer & Stern, 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost".
    """
    eps1, eps2 = _validate.pair("adafactor", "eps", eps)
    _validate.in_range("adafactor", "lr", lr, 0.0)
    _validate.in_range("adafactor", "beta2_decay", beta2_decay, high=0.0)
    if eps1 is not None:
        _validate.in_range("adafactor", "eps[0]", eps1, 0.0)
    _validate.in_range("adafactor", "eps[1]", eps2, 0.0)
    _validate.in_range("adafactor", "d", d, 1.0)
    _validate.in_range("adafactor", "weight_decay", weight_decay, 0.0)
    # The factored step already carries the learning rate (through min(lr, 1/sqrt(t))), so the
    # final step is -1; torch.optim's decay multiplies the raw lr, so it enters the decay here.
    return descent(
        scale_by_factored_rms(lr, beta2_decay, eps1, eps2, d),
        lr=1.0,
        maximize=maximize,
        weight_decay=_product(lr, weight_decay) if nonzero(weight_decay) else 0.0,
        decoupled_weight_decay=True,
    )


def _product(a: Hyperparameter, b: Hyperparameter) -> Hyperparameter:
    """``a * b``, a schedule when either is one (``inject_hyperparams`` validates with the schedules)."""
    if callable(a) or callable(b):
        return lambda count: value_at(a, count) * value_at(b, count)
    return a * b
