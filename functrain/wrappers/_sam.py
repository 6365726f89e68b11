"""sam: sharpness-aware minimisation, the gradient taken again at a nearby worst-case point."""

from __future__ import annotations

import torch

from .. import _tree, _validate
from ..base import GradientTransformation, require_params, update_and_apply
from ..transforms import global_norm

# davda54/sam's guard against a zero gradient (then e = 0 and SAM is the inner step at w).
_EPS = 1e-12


def sam(tx: GradientTransformation, rho: float | torch.Tensor = 0.05, adaptive: bool = False) -> GradientTransformation:
    r"""Sharpness-aware minimisation: ``tx`` steps with the gradient at the worst point of a ball around ``w``.

    With :math:`g = \nabla L(w)`, the gradient the step was given, SAM climbs to

    .. math::
        \hat w = w + e(w), \qquad e(w) = \rho \, \frac{T_w^2\, g}{\lVert T_w\, g \rVert_2 + 10^{-12}},

    where :math:`T_w = I` (SAM; :math:`e = \rho\, g / \lVert g \rVert`) or, with ``adaptive=True``,
    :math:`T_w = \operatorname{diag}(|w|)` (ASAM, scale-invariant: :math:`e = \rho\, w^2 g / \lVert |w|\, g
    \rVert`). The norm is over the whole tree, all parameters together. It then evaluates the loss's
    gradient there, :math:`\hat g = \nabla L(\hat w)`, and runs ``tx`` on :math:`\hat g` at the original
    parameters :math:`w` (weight decay, trust ratios and the step apply to :math:`w`).

    The second gradient comes from the ``value_fn`` extra argument, ``value_fn(params) -> (loss, grads)``,
    which ``ft.make_train_step`` supplies (the same batch, the same microbatches, no loss scaling); a bare
    ``tx.update`` must be given it. So one SAM step costs two forward and backward passes, as in the
    papers. ``tx`` gets the other extra arguments as they were (``value`` is the loss at :math:`w`).

    BatchNorm: ``make_train_step``'s ``value_fn`` runs the model on copies of the buffers and drops their
    updates, so the running statistics move once per step, from the first pass at :math:`w`. That is
    davda54/sam's recipe (its example sets the BatchNorm momentum to 0 for the second pass,
    ``disable_running_stats``); a two-pass loop without it updates them twice, the second time with
    :math:`\hat w`'s batch statistics. Both passes normalise with the batch's own statistics (train mode),
    so the gradients are the same either way.

    The state is ``tx``'s own (SAM keeps nothing between steps): a checkpoint of ``tx`` loads into a
    ``sam(tx)`` run and back. ``tx``'s declared fast path (e.g. AdamW's fused kernel) is passed on.

    Equal to davda54/sam's ``SAM`` optimiser (``first_step``, a second ``backward``, ``second_step``: the
    reference two-pass SAM that timm and mmdetection users run) over torch.optim's SGD and AdamW.

    Args:
        tx: the base optimiser, run on the gradient at :math:`\hat w`.
        rho: :math:`\rho`, the radius of the neighbourhood, >= 0 (0.05 for SAM; ASAM's papers use larger,
            e.g. 0.5-2.0): a float or a 0-d tensor.
        adaptive: ASAM's scale-invariant neighbourhood, :math:`T_w = \operatorname{diag}(|w|)`.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> loss_and_grad = lambda p: ((p["w"] ** 4).sum(), {"w": 4 * p["w"] ** 3})  # value_fn
        >>> tx = ft.sam(ft.sgd(lr=0.01), rho=0.1)
        >>> g = loss_and_grad(params)[1]
        >>> updates, state = tx.update(g, tx.init(params), params, value_fn=loss_and_grad)
        >>> e = 0.1 * g["w"] / g["w"].norm()  # the ascent step
        >>> torch.allclose(updates["w"], -0.01 * loss_and_grad({"w": params["w"] + e})[1]["w"])
        True

    References:
        Foret, Kleiner, Mobahi and Neyshabur, 2021, "Sharpness-Aware Minimization for Efficiently Improving
        Generalization" (Algorithm 1). Kwon, Kim, Park and Choi, 2021, "ASAM: Adaptive Sharpness-Aware
        Minimization for Scale-Invariant Learning of Deep Neural Networks" (Algorithm 1). davda54/sam
        (``sam.py``), the widely used PyTorch implementation both follow here.
    """
    owner = "sam"
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"{owner}: tx must be a GradientTransformation, got {type(tx).__name__}")
    _validate.not_a_schedule(owner, "rho", rho)
    _validate.in_range(owner, "rho", rho, 0.0)
    _validate.boolean(owner, "adaptive", adaptive)

    def ascent(grads, params):
        """e(w): the step to the worst point of the rho-ball, to first order."""
        scaled = _tree.map(lambda w, g: w.abs() * g, params, grads) if adaptive else grads
        scale = rho / (global_norm(scaled) + _EPS)
        if adaptive:
            return _tree.map(lambda w, g: w.pow(2) * g * scale.to(w.dtype), params, grads)
        return _tree.map(lambda g: g * scale.to(g.dtype), grads)

    def sharp_gradient(grads, params, value_fn):
        """The gradient at w + e(w)."""
        require_params(owner, params)
        if value_fn is None:
            raise ValueError(
                f"{owner} needs the value_fn extra argument (value_fn(params) -> (loss, grads): the loss and its "
                "gradient at other parameters) for its second gradient: train with ft.make_train_step, which "
                "supplies it, or call tx.update(grads, state, params, value_fn=...)"
            )
        if not _tree.tracing():
            _tree.check_updates(grads, params)  # named here, before the perturbation's arithmetic
        _, sharp = value_fn(_tree.add(params, ascent(grads, params)))
        return sharp

    def update(updates, state, params=None, *, value_fn=None, **extra):
        sharp = sharp_gradient(updates, params, value_fn)
        return tx.update(sharp, state, params, value_fn=value_fn, **extra)

    def update_and_apply_inner(updates, state, params, *, donate=False, value_fn=None, **extra):
        sharp = sharp_gradient(updates, params, value_fn)
        return update_and_apply(tx, sharp, state, params, donate=donate, value_fn=value_fn, **extra)

    return GradientTransformation(tx.init, update, update_and_apply_inner if tx.update_and_apply is not None else None)
