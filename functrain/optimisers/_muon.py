"""Muon."""

from __future__ import annotations

from .. import _validate
from ..base import GradientTransformation, Hyperparameter
from ..transforms import ADJUST_LR_FNS, NS_COEFFICIENTS, scale_by_muon
from ..wrappers import schedulable
from ._common import descent


@schedulable
def muon(
    lr: Hyperparameter = 1e-3,
    weight_decay: Hyperparameter = 0.1,
    momentum: Hyperparameter = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[Hyperparameter, Hyperparameter, Hyperparameter] = NS_COEFFICIENTS,
    eps: Hyperparameter = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
) -> GradientTransformation:
    r"""Muon, numerically equal to ``torch.optim.Muon``: for 2-D matrices only.

    Update rule, with :math:`g_t` the gradient of an :math:`A \times B` matrix :math:`\theta`:

    .. math::
        B_t &= \mu B_{t-1} + (1-\mu) g_t, \qquad
            \tilde B_t = (1-\mu) g_t + \mu B_t \text{ if nesterov else } B_t\\
        O_t &= \mathrm{NS}^{(a,b,c)}_k\big(\tilde B_t / \max(\lVert\tilde B_t\rVert_F, \epsilon)\big)
            \quad\text{(in bfloat16)}\\
        \theta_t &= \theta_{t-1} - \gamma\lambda\theta_{t-1} - \gamma\, s(A, B)\, O_t

    where NS is :math:`k` steps of the quintic Newton-Schulz iteration
    :math:`X \leftarrow aX + (bXX^T + c(XX^T)^2)X` (see
    :func:`functrain.transforms.orthogonalize_via_newton_schulz`) and :math:`s(A, B)` is the
    learning-rate adjustment chosen by ``adjust_lr_fn``: None or "original"
    :math:`\sqrt{\max(1, A/B)}`, "match_rms_adamw" :math:`0.2\sqrt{\max(A, B)}`, "spectral_unclamped"
    :math:`\sqrt{A/B}`. Weight decay is decoupled and uses the unadjusted :math:`\gamma`.

    ``init`` raises a ValueError naming any parameter that is not 2-D: biases, gains and embeddings
    belong with another optimiser, e.g. through ``ft.partition``.

    Args:
        lr: learning rate :math:`\gamma`.
        weight_decay: decoupled decay :math:`\lambda`.
        momentum: momentum :math:`\mu`.
        nesterov: use the Nesterov look-ahead :math:`\tilde B_t`.
        ns_coefficients: :math:`(a, b, c)` of the Newton-Schulz quintic.
        eps: :math:`\epsilon`, the floor of the norm the input is divided by.
        ns_steps: :math:`k`, the number of Newton-Schulz iterations (fewer than 100).
        adjust_lr_fn: None, "original", "match_rms_adamw" or "spectral_unclamped".

    Every float argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]])}
        >>> tx = ft.muon(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([[0.5, -3.0], [1.0, 1.0]])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([[ 0.9519, -1.9105],
                [ 0.3895,  2.9429]])
        >>> ft.muon().init({"fc.bias": torch.zeros(10)})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: muon: parameter 'fc.bias' has shape (10,); Muon only updates 2-D matrices - route ...

    References:
        Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks",
        https://kellerjordan.github.io/posts/muon/.
        Liu et al., 2025, "Muon is Scalable for LLM Training" (match_rms_adamw).
    """
    _validate.in_range("muon", "lr", lr, 0.0)
    _validate.in_range("muon", "weight_decay", weight_decay, 0.0)
    _validate.in_range("muon", "momentum", momentum, 0.0)
    _validate.in_range("muon", "eps", eps, 0.0)
    _validate.one_of("muon", "adjust_lr_fn", adjust_lr_fn, ADJUST_LR_FNS)
    if len(ns_coefficients) != 3:
        raise ValueError(f"muon: ns_coefficients must be 3 values (a, b, c), got {ns_coefficients!r}")
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 0 <= ns_steps < 100:
        raise ValueError(f"muon: ns_steps must be an int in [0, 100), got {ns_steps!r}")
    return descent(
        scale_by_muon(momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn),
        lr=lr,
        weight_decay=weight_decay,
        decoupled_weight_decay=True,
    )
