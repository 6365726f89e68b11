"""Rprop: sign-based steps with per-element adaptive step sizes."""

from __future__ import annotations

from .. import _validate
from ..base import GradientTransformation, Hyperparameter
from ..transforms import scale_by_rprop
from ..wrappers import schedulable
from ._common import descent


@schedulable(complex_params=True)
def rprop(
    lr: Hyperparameter = 1e-2,
    etas: tuple[Hyperparameter, Hyperparameter] = (0.5, 1.2),
    step_sizes: tuple[Hyperparameter, Hyperparameter] = (1e-6, 50.0),
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""Resilient backpropagation, numerically equal to ``torch.optim.Rprop``.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``),
    :math:`s = \operatorname{sign}(g_t g_{t-1})` element-wise and :math:`\Delta_0 = \gamma`:

    .. math::
        \Delta_t &= \operatorname{clamp}\big(\Delta_{t-1} \cdot
            \{\eta^+ \text{ if } s>0;\ \eta^- \text{ if } s<0;\ 1 \text{ otherwise}\},\
            \Delta_{\min}, \Delta_{\max}\big)\\
        g_t &\leftarrow 0 \text{ where } s < 0 \quad\text{(and that zero is the next } g_{t-1})\\
        \theta_t &= \theta_{t-1} - \operatorname{sign}(g_t)\, \Delta_t

    Args:
        lr: :math:`\gamma`, the initial step size of every element. It is read once, by ``init``, as
            torch.optim reads it once when it creates the state: a schedule for it has no effect
            after its value at step 0.
        etas: :math:`(\eta^-, \eta^+)`, the factors that shrink and grow a step size, with
            :math:`0 < \eta^- < 1 < \eta^+`.
        step_sizes: :math:`(\Delta_{\min}, \Delta_{\max})`, the bounds of every step size.
        maximize: maximise the objective instead of minimising it.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.rprop(lr=0.1)
        >>> state = tx.init(params)
        >>> for grad in ([0.5, -3.0], [0.2, 1.0]):  # the second gradient of w[1] changes sign
        ...     updates, state = tx.update({"w": torch.tensor(grad)}, state, params)
        ...     params = ft.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.7800, -1.9000])

    References:
        Riedmiller & Braun, 1993, "A Direct Adaptive Method for Faster Backpropagation Learning:
        The RPROP Algorithm".
    """
    eta_minus, eta_plus = _validate.pair("rprop", "etas", etas)
    step_min, step_max = _validate.pair("rprop", "step_sizes", step_sizes)
    _validate.in_range("rprop", "lr", lr, 0.0)
    _validate.in_range("rprop", "etas[0]", eta_minus, 0.0, 1.0, low_open=True, high_open=True)
    _validate.in_range("rprop", "etas[1]", eta_plus, 1.0, low_open=True)
    _validate.in_range("rprop", "step_sizes[0]", step_min, 0.0)  # torch.optim checks neither bound
    _validate.in_range("rprop", "step_sizes[1]", step_max, 0.0)
    # scale_by_rprop returns sign(g) * step size; descent's `lr=1.0` is the exact `* -1` of a descent.
    return descent(scale_by_rprop(lr, (eta_minus, eta_plus), (step_min, step_max)), lr=1.0, maximize=maximize)
