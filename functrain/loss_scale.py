"""Dynamic loss scaling for float16 training, equal to ``torch.amp.GradScaler``.

float16 gradients underflow to zero below ~6e-8. Multiplying the loss by a large scale ``S`` before
differentiating keeps them representable; the optimiser then sees ``grads / S``. When a step
overflows (a gradient is inf or NaN) the step is skipped and ``S`` halves; after
``growth_interval`` clean steps in a row ``S`` doubles.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _tree, _validate
from .base import GradientTransformation, OptState, check_state_type, register_state, step_count


@register_state
class LossScaleState(NamedTuple):
    scale: Tensor  # 0-d float32: the factor the step multiplies the loss by
    growth_tracker: Tensor  # 0-d int32: clean steps since the scale last changed
    inner_state: OptState


def dynamic_loss_scale(
    tx: GradientTransformation,
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
) -> GradientTransformation:
    """Wraps ``tx`` to receive gradients of ``scale * loss``, as ``torch.amp.GradScaler`` drives an optimiser.

    ``update`` unscales the gradients (multiplies by the float32 reciprocal of the scale, as
    GradScaler does), and if any is non-finite returns zero updates and leaves ``tx``'s state
    unchanged (a skipped step); then it updates the scale exactly as ``GradScaler.update``.
    :func:`functrain.make_train_step` multiplies the loss by ``state.opt_state.scale`` when the
    optimiser holds this transform (at any depth), and reports it as ``metrics["loss_scale"]``.
    Put it before anything that looks at gradient magnitudes (``dynamic_loss_scale(chain(clip, adam))``,
    not ``chain(clip, dynamic_loss_scale(adam))``), just as GradScaler needs ``unscale_`` before clipping.

    Args:
        tx: the optimiser to drive.
        init_scale: the initial scale.
        growth_factor: multiplies the scale after ``growth_interval`` clean steps (> 1).
        backoff_factor: multiplies the scale after a non-finite step (in (0, 1)).
        growth_interval: clean steps between growths (int >= 1).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.dynamic_loss_scale(ft.sgd(lr=1.0), init_scale=8.0)
        >>> params = {"w": torch.tensor([1.0])}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([float("inf")])}, state, params)
        >>> updates["w"], state.scale
        (tensor([0.]), tensor(4.))
    """
    owner = "dynamic_loss_scale"
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"{owner}: tx must be a GradientTransformation, got {type(tx).__name__}")
    _validate.in_range(owner, "init_scale", init_scale, 0.0, low_open=True)
    _validate.in_range(owner, "growth_factor", growth_factor, 1.0, low_open=True)
    _validate.in_range(owner, "backoff_factor", backoff_factor, 0.0, 1.0, low_open=True, high_open=True)
    _validate.integer(owner, "growth_interval", growth_interval, 1)

    def init(params):
        device = step_count(params).device
        return LossScaleState(
            torch.full((), init_scale, dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.int32, device=device),
            tx.init(params),
        )

    def update(updates, state, params=None, **extra):
        # The class only: it holds no tensor shaped like the params; the inner transformation
        # checks its own state (every ft optimiser does). The gradients: it unscales each first.
        check_state_type("ft.dynamic_loss_scale", state, LossScaleState)
        _tree.check_updates(updates, params)
        inv_scale = state.scale.double().reciprocal().float()  # GradScaler.unscale_'s rounding
        # A float32 multiplier: fp16 gradients keep their dtype but are unscaled in float32 maths,
        # as GradScaler's kernel does (1/S itself underflows in fp16 for S >= 2**25).
        grads = _tree.map(lambda g: g * inv_scale.to(g.device), updates)
        inner_updates, inner_state = tx.update(grads, state.inner_state, params, **extra)
        # The inner updates are checked too: in data-parallel training an overflow on another rank
        # reaches this rank through the gradient all-reduce, and every rank must skip that step.
        finite = _tree.all_finite(grads) & _tree.all_finite(inner_updates)
        updates = _tree.where_or_zero(finite, inner_updates)
        inner_state = _tree.where(finite, inner_state, state.inner_state)
        scale, tracker = _next_scale(state.scale, state.growth_tracker, finite)
        return updates, LossScaleState(scale, tracker, inner_state)

    def _next_scale(scale, tracker, finite):
        """``torch._amp_update_scale_``: back off on overflow, grow after ``growth_interval`` clean steps."""
        clean = tracker + 1
        grow = finite & (clean == growth_interval)
        grown = scale * growth_factor
        new_scale = torch.where(finite, torch.where(grow & torch.isfinite(grown), grown, scale), scale * backoff_factor)
        new_tracker = torch.where(finite & ~grow, clean, torch.zeros_like(tracker))
        return new_scale, new_tracker

    # Declined: an overflowing step is skipped after the inner update is computed; a pass that wrote
    # the parameters (and moments) first could not keep the old ones.
    return GradientTransformation(init, update, update_and_apply=None)
