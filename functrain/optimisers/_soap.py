"""SOAP, as HeavyBall 3.2.1's ``SOAP``."""

from __future__ import annotations

import torch

from .. import _validate
from ..base import GradientTransformation, Hyperparameter
from ..combine import chain
from ..transforms import add_decayed_weights, scale_by_schedule, scale_by_soap
from ..wrappers import schedulable
from ._common import nonzero


def heavyball_descent(lr, weight_decay, warmup_steps: int, skip_first: bool) -> GradientTransformation:
    """HeavyBall's last line, ``p <- p (1 - lr_t wd) - lr_t u``, as ``-lr_t (u + wd p)``, with its linear
    warm-up ``lr_t = lr t / max(t, warmup_steps + 1)`` (``t`` the 1-based step). ``skip_first``: the
    first step moves nothing, decay included (SOAP's first step only builds its preconditioner).

    ``lr_t`` is computed in float32, as HeavyBall computes it (a Python float times its int64 step
    count gives torch's default dtype): in float64 that is a relative change of ~1e-8 in the step,
    and without it a float64 run differs from HeavyBall's by ~1e-7 after 25 steps."""

    def step_size(count):
        t = count + 1
        size = torch.as_tensor(lr, dtype=torch.float32, device=count.device) * t / t.clamp(min=warmup_steps + 1)
        return torch.where(count == 0, 0.0, -size) if skip_first else -size

    parts = [add_decayed_weights(weight_decay) if nonzero(weight_decay) else None, scale_by_schedule(step_size)]
    return chain(*(p for p in parts if p is not None))


@schedulable
def soap(
    lr: Hyperparameter = 3e-3,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.95),
    shampoo_beta: Hyperparameter = 0.95,
    eps: Hyperparameter = 1e-8,
    weight_decay: Hyperparameter = 0.01,
    precondition_frequency: int = 2,
    max_precond_dim: int = 2048,
    merge_dims: bool = True,
    precondition_1d: bool = False,
    warmup_steps: int = 0,
) -> GradientTransformation:
    r"""SOAP (ShampoO with Adam in the Preconditioner's eigenbasis), numerically equal to HeavyBall
    3.2.1's ``heavyball.SOAP`` with the same arguments.

    Update rule, for a parameter :math:`\theta` with gradient :math:`G_t` (trailing dimensions merged
    when ``merge_dims``) and a Kronecker factor :math:`L_i` with eigenbasis :math:`Q_i` per
    preconditioned dimension, with :math:`\hat\beta(\beta, s) = 1 - (1-\beta)/(1-\beta^s)`:

    .. math::
        \tilde G &= G_t \times_i Q_i^T\\
        m_t &= \hat\beta(\beta_1, t-1)\, m_{t-1} + (1 - \hat\beta(\beta_1, t-1))\, \tilde G, \qquad
        v_t = \hat\beta(\beta_2, t-1)\, v_{t-1} + (1 - \hat\beta(\beta_2, t-1))\, \tilde G^2\\
        \theta_t &= \theta_{t-1}(1 - \gamma_t\lambda)
            - \gamma_t \big(m_t / \max(\sqrt{v_t}, \epsilon)\big) \times_i Q_i\\
        L_i &\leftarrow \hat\beta(\beta_s, t)\, L_i + (1 - \hat\beta(\beta_s, t))\, G_{(i)} G_{(i)}^T

    and every ``precondition_frequency`` steps (HeavyBall's running sum of
    ``1 / precondition_frequency`` passing an integer) each :math:`Q_i` takes one QR power-iteration
    step towards the eigenvectors of :math:`L_i`, :math:`m` rotated with it. The first step sets
    :math:`L_i = G_{(i)} G_{(i)}^T`, :math:`Q_i` its eigenvectors (``torch.linalg.eigh``), and
    leaves the parameters as they are. :math:`\gamma_t = \gamma\, t / \max(t, w + 1)` is a linear
    warm-up over ``warmup_steps`` :math:`w`. See :func:`functrain.transforms.scale_by_soap`.

    Where this follows HeavyBall rather than the authors' code (Vyas et al.'s ``soap.py``), and why:
    HeavyBall is the pinned reference. Its bias correction is folded into the decays
    (:math:`\hat\beta`, where the authors scale the step by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`;
    HeavyBall 3 removed ``correct_bias``); the denominator is :math:`\max(\sqrt v, \epsilon)` rather
    than :math:`\sqrt v + \epsilon`; the first moment is kept in the eigenbasis and rotated at each
    refresh (the authors keep it in the original basis; the two are equal in exact arithmetic); the
    QR refresh shifts the factor by a small multiple of its largest eigenvalue and keeps each
    column in place (the authors sort the second moment by the estimated eigenvalues); the first
    step also skips weight decay. Differences from HeavyBall itself: the first eigenbasis spans the
    first factor's null space canonically (``initial_basis`` in ``functrain/transforms/_soap.py``), where
    ``eigh``'s eigenvectors for the repeated zero eigenvalue follow the gradient's last bit, so a
    sharded or compiled step (which rounds the gradient otherwise) would drift from an eager one
    (the parity tests give HeavyBall the same first basis); the moments are kept in the
    parameter's dtype (HeavyBall's ``storage_dtype`` defaults to float32), and a 0-d parameter is not
    merged (HeavyBall's ``merge_dims`` fails on one); it is plain Adam either way. HeavyBall's
    ``caution``, ``mars``, ``palm``, stochastic rounding, clipping and its own compilation are left
    out (compose ``ft.cautious`` or ``ft.clip_by_global_norm`` instead).

    Args:
        lr: learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`, decays of the first and second moments, each in [0, 1).
        shampoo_beta: :math:`\beta_s`, decay of the Kronecker factors, in [0, 1).
        eps: :math:`\epsilon`, floor of the denominator, > 0.
        weight_decay: decoupled decay :math:`\lambda`.
        precondition_frequency: refresh the eigenbases every this many steps (an int >= 1).
        max_precond_dim: dimensions longer than this keep no factor (an int >= 1).
        merge_dims: merge trailing dimensions up to ``max_precond_dim`` (a conv kernel becomes a matrix).
        precondition_1d: give vectors a factor too.
        warmup_steps: linear learning-rate warm-up length :math:`w` (an int >= 0).

    Every float argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]])}
        >>> tx = ft.soap(lr=0.1, weight_decay=0.0)
        >>> state = tx.init(params)
        >>> for g in ([[0.5, -3.0], [1.0, 1.0]], [[0.2, -1.0], [0.5, 2.0]]):
        ...     updates, state = tx.update({"w": torch.tensor(g)}, state, params)
        ...     params = ft.apply_updates(params, updates)
        >>> params["w"]
        tensor([[ 1.0619, -1.9306],
                [ 0.3821,  2.8679]])

    References:
        Vyas et al., 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321,
        https://github.com/nikhilvyas/SOAP.
        HeavyBall 3.2.1, ``heavyball.SOAP`` (https://github.com/HomebrewML/HeavyBall).
    """
    beta1, beta2 = _validate.pair("soap", "betas", betas)
    _validate.in_range("soap", "lr", lr, 0.0)
    _validate.in_range("soap", "betas[0]", beta1, 0.0, 1.0, high_open=True)
    _validate.in_range("soap", "betas[1]", beta2, 0.0, 1.0, high_open=True)
    _validate.in_range("soap", "shampoo_beta", shampoo_beta, 0.0, 1.0, high_open=True)
    _validate.in_range("soap", "eps", eps, 0.0, low_open=True)
    _validate.in_range("soap", "weight_decay", weight_decay, 0.0)
    _validate.integer("soap", "precondition_frequency", precondition_frequency, 1)
    _validate.integer("soap", "max_precond_dim", max_precond_dim, 1)
    _validate.integer("soap", "warmup_steps", warmup_steps, 0)
    return chain(
        scale_by_soap(
            beta1, beta2, shampoo_beta, eps, precondition_frequency, max_precond_dim, merge_dims, precondition_1d
        ),
        heavyball_descent(lr, weight_decay, warmup_steps, skip_first=True),
    )
