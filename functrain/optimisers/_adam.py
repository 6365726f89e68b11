"""Adam and AdamW."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _tree, _validate
from .._donate import is_donated
from ..base import GradientTransformation, Hyperparameter, with_fused_apply
from ..transforms import scale_by_adam, scale_by_amsgrad
from ..transforms._adam import fused_adam_step
from ..wrappers import schedulable
from ._common import descent, nonzero


def check_adam_args(owner: str, lr, betas, eps, weight_decay) -> tuple:
    """torch.optim.Adam's checks; returns ``(beta1, beta2)``."""
    beta1, beta2 = _validate.pair(owner, "betas", betas)
    _validate.in_range(owner, "lr", lr, 0.0)
    _validate.in_range(owner, "eps", eps, 0.0)
    _validate.in_range(owner, "betas[0]", beta1, 0.0, 1.0, high_open=True)
    _validate.in_range(owner, "betas[1]", beta2, 0.0, 1.0, high_open=True)
    _validate.in_range(owner, "weight_decay", weight_decay, 0.0)
    return beta1, beta2


@schedulable
def adam(
    lr: Hyperparameter = 1e-3,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.999),
    eps: Hyperparameter = 1e-8,
    weight_decay: Hyperparameter = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> GradientTransformation:
    r"""Adam, numerically equal to ``torch.optim.Adam``.

    Update rule, with :math:`g_t` the gradient (negated when ``maximize``):

    .. math::
        g_t &\leftarrow g_t + \lambda\theta_{t-1} \quad\text{(unless decoupled)}\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ if amsgrad else } v_t\\
        \theta_t &= \theta_{t-1} - \gamma\lambda\theta_{t-1}\,[\text{decoupled}]
                   - \gamma \frac{m_t/(1-\beta_1^t)}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    Args:
        lr: learning rate :math:`\gamma`.
        betas: decay rates :math:`(\beta_1, \beta_2)` of the first and second moments, each in [0, 1).
        eps: :math:`\epsilon`, added to the denominator for numerical stability.
        weight_decay: :math:`\lambda`; an L2 penalty, or decoupled decay (AdamW) with
            ``decoupled_weight_decay=True``.
        amsgrad: use the running maximum of the second moment (AMSGrad).
        maximize: maximise the objective instead of minimising it.
        decoupled_weight_decay: decay the weights directly, as AdamW does.

    Every numeric argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.adam(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([ 0.9000, -1.9000])

    References:
        Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization".
        Reddi et al., 2018, "On the Convergence of Adam and Beyond" (AMSGrad).
    """
    return _adam("adam", lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay)


@schedulable
def adamw(
    lr: Hyperparameter = 1e-3,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.999),
    eps: Hyperparameter = 1e-8,
    weight_decay: Hyperparameter = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""AdamW: Adam with decoupled weight decay, numerically equal to ``torch.optim.AdamW``.

    .. math::
        \theta_t = \theta_{t-1} - \gamma\lambda\theta_{t-1}
                   - \gamma \frac{m_t/(1-\beta_1^t)}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    with :math:`m_t, \hat v_t` as in :func:`adam`. It is ``adam(..., decoupled_weight_decay=True)``
    with torch's AdamW default ``weight_decay=1e-2``.

    Args:
        lr: learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon` in the denominator.
        weight_decay: decoupled decay :math:`\lambda`.
        amsgrad: use AMSGrad's running maximum of the second moment.
        maximize: maximise the objective instead of minimising it.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.adamw(lr=0.1, weight_decay=0.5)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([ 0.8500, -1.8000])

    References:
        Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization".
    """
    return _adam("adamw", lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay=True)


def _adam(owner, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay) -> GradientTransformation:
    beta1, beta2 = check_adam_args(owner, lr, betas, eps, weight_decay)
    direction = (scale_by_amsgrad if amsgrad else scale_by_adam)(beta1, beta2, eps)
    tx = descent(
        direction, lr=lr, maximize=maximize, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay
    )
    if maximize or (nonzero(weight_decay) and not decoupled_weight_decay):
        return tx  # the chain starts with a negation or an L2 term: not the fused kernel's shape
    return _fused_when_eager(tx, beta1, beta2, eps, lr, weight_decay, amsgrad)


def _fused_when_eager(tx: GradientTransformation, b1, b2, eps, lr, weight_decay, amsgrad) -> GradientTransformation:
    """``tx`` (the chain ``scale_by_adam -> decoupled decay -> -lr``), whose eager update runs the
    whole chain as one call of torch's fused AdamW kernel per (device, dtype) group, and which
    offers a fused apply (see ``with_fused_apply``) for training steps.

    The update: the chain's own multi-tensor path writes the Adam direction, then the decayed and
    scaled update, into two new buffers; here the kernel's "parameter" starts at
    ``-lr * wd * params`` and the kernel subtracts ``lr * direction`` from it in the same pass, so an
    update allocates only the new moments and the update.

    The apply: the kernel runs on the parameters themselves (a pure step's new copy of them, or a
    donated step's own tensors), exactly as ``torch.optim.AdamW(fused=True)`` steps, so no update
    buffer is written at all.

    The state is exactly the chain's. Anything else (tensor hyperparameters, compile, vmap, grad)
    runs the chain.
    """
    if any(isinstance(h, Tensor) for h in (b1, b2, eps, lr, weight_decay)):
        return tx

    def fusable(updates, params) -> bool:
        leaves = _tree.leaves(updates)
        return (
            params is not None
            and _tree.fast_path_ok(leaves)
            and _tree.fast_path_ok(_tree.leaves(params))
            and all(t.device.type in ("cpu", "cuda") for t in leaves)
        )

    def fused_step(updates, state, params, starts, decay):
        """The kernel, decaying by ``decay``, on ``starts(ps)`` per group: (the stepped lists, the new state)."""
        adam_state, *rest = state
        count = adam_state.count + 1

        def fused(gs, ps, *moments):
            out = starts(ps)
            return (out, *fused_adam_step(out, gs, moments, count, lr, b1, b2, eps, decay))

        out, *new_moments = _tree.foreach_map(fused, updates, params, *adam_state[1:])
        return out, (type(adam_state)(count, *new_moments), *rest)

    def update(updates, state, params=None, **extra):
        if not fusable(updates, params):
            return tx.update(updates, state, params, **extra)
        # The kernel's "parameter" starts at the decay term; the kernel then adds -lr * direction.
        return fused_step(updates, state, params, lambda ps: torch._foreach_mul(ps, -lr * weight_decay), 0.0)

    def apply(updates, state, params):
        if not fusable(updates, params):
            return None
        # A donated step's params are stepped where they lie, a pure step's in a new copy.
        own = is_donated()
        return fused_step(updates, state, params, lambda ps: ps if own else [p.clone() for p in ps], weight_decay)

    return with_fused_apply(GradientTransformation(tx.init, update), apply)
