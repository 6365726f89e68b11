"""Adam and AdamW."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _tree, _validate
from ..base import GradientTransformation, Hyperparameter, UpdateAndApplyFn, update_and_apply as ft_update_and_apply
from ..transforms import ScaleByAdamState, ScaleByAmsgradState, scale_by_adam, scale_by_amsgrad
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


@schedulable(complex_params=True)
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


@schedulable(complex_params=True)
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
    if any(isinstance(h, Tensor) for h in (beta1, beta2, eps, lr, weight_decay)):
        return tx  # the kernel takes float hyperparameters
    if not hasattr(torch, "_fused_adamw_"):
        return tx  # a private kernel, which a later torch may drop: steps then take the foreach path
    return tx._replace(update_and_apply=_fused_update_and_apply(tx, beta1, beta2, eps, lr, weight_decay))


def _fused_update_and_apply(tx: GradientTransformation, b1, b2, eps, lr, weight_decay) -> UpdateAndApplyFn:
    """The declared fast path of ``tx`` (the chain ``scale_by_adam -> decoupled decay -> -lr``): the
    whole chain and the apply as one call of torch's fused AdamW kernel per (device, dtype) group,
    stepping the parameters themselves, exactly as ``torch.optim.AdamW(fused=True)`` does. No update
    buffer is written at all, and one pass over memory replaces the foreach form's eight.

    Pure (``donate=False``), the kernel runs on new copies of the parameters and moments, which a
    pure step must allocate anyway; donated, on the caller's own tensors. The state is exactly the
    chain's. Anything the kernel cannot take (compile, vmap, grad, other devices) runs the reference.
    """

    def update_and_apply(updates, state, params, *, donate=False, **extra):
        if not _kernel_runs(updates, state, params):
            return ft_update_and_apply(tx, updates, state, params, donate=donate, **extra)  # tx: the reference
        adam_state, *rest = state
        # The kernel reads and writes by its inputs' sizes: shapes checked right here, whoever calls.
        moments = [(moment, f"opt_state[0].{name}") for name, moment in zip(adam_state._fields[1:], adam_state[1:])]
        _tree.check_shapes_against(params, "params", [(updates, "updates"), *moments])
        count = adam_state.count + 1

        def fused(gs, ps, *moments):
            ps, *moments = (list(ts) if donate else [t.clone() for t in ts] for ts in (ps, *moments))
            mu, nu, *nu_max = moments
            torch._fused_adamw_(
                ps,
                gs,
                mu,
                nu,
                nu_max[0] if nu_max else [],
                [count.to(device=gs[0].device, dtype=torch.float32)] * len(gs),
                lr=lr,
                beta1=b1,
                beta2=b2,
                weight_decay=weight_decay,
                eps=eps,
                amsgrad=bool(nu_max),
                maximize=False,
            )
            return (ps, *moments)

        new_params, *moments = _tree.foreach_map(fused, updates, params, *adam_state[1:])
        return new_params, (type(adam_state)(count, *moments), *rest)

    return update_and_apply


def _kernel_runs(updates, state, params) -> bool:
    """Whether the fused kernel can take these trees: plain eager floating-point tensors on the CPU
    or CUDA (nothing to differentiate, no vmap), and the state of the chain it was declared for."""
    leaves = _tree.leaves(updates)
    return (
        isinstance(state, tuple)
        and len(state) > 0
        and isinstance(state[0], (ScaleByAdamState, ScaleByAmsgradState))
        and _tree.fast_path_ok(leaves)
        and _tree.fast_path_ok(params)
        and all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in leaves)
    )
