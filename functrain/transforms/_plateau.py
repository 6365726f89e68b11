"""reduce_on_plateau: scale the updates down when the loss stops improving."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree, _validate
from ..base import GradientTransformation, register_state, step_count


@register_state
class ReduceOnPlateauState(NamedTuple):
    scale: Tensor  # the factor applied to the updates, lr / base lr in torch's terms (0-d float64)
    best: Tensor  # the best (accumulated) loss so far, +-inf before the first (0-d float64)
    num_bad_epochs: Tensor  # decisions since the last improvement (0-d int64)
    cooldown_counter: Tensor  # decisions left in the cooldown after a reduction (0-d int64)
    count: Tensor  # updates done so far (0-d int64)
    accumulated_value: Tensor  # sum of the losses since the last decision (0-d float64)


def reduce_on_plateau(
    mode: str = "min",
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_scale: float = 0.0,
    eps: float = 1e-8,
    accumulation_size: int = 1,
) -> GradientTransformation:
    r"""Multiplies updates by a scale that drops by ``factor`` when the loss stops improving.

    The loss comes in as ``update(updates, state, params, value=loss)`` (a float or a 0-d tensor).
    Each update is multiplied by the current ``state.scale`` (starting at 1); then the loss is
    recorded and, as ``torch.optim.lr_scheduler.ReduceLROnPlateau.step(loss)`` does, compared with
    the best so far (``mode="min"``: better means :math:`v < b(1 - \text{threshold})` for
    ``threshold_mode="rel"`` or :math:`v < b - \text{threshold}` for ``"abs"``; ``"max"`` mirrors
    it). After more than ``patience`` decisions without improvement, outside a ``cooldown``, the
    scale becomes :math:`\max(s \cdot \text{factor}, \text{min\_scale})`, unless that lowers it by
    no more than ``eps``. So the scale used by update :math:`t + 1` is decided by the losses up to
    :math:`t`: the same lrs as torch's scheduler stepped once per optimiser step, after
    ``optimizer.step()``.

    Place it after the learning rate, ``chain(ft.sgd(lr=base_lr), reduce_on_plateau(...))``: the
    scale is torch's ``lr / base_lr``, so torch's absolute ``min_lr`` and ``eps`` translate to
    ``min_scale = min_lr / base_lr`` and ``eps = torch_eps / base_lr`` (identical when base_lr is
    1; torch's default eps of 1e-8 only matters for tiny learning rates either way).

    With ``accumulation_size = N > 1`` (optax's option) the losses of N updates are averaged and
    one decision is made per N updates, on that mean; ``patience`` and ``cooldown`` then count
    decisions. Compile-safe: the loss is never read on the host; every branch is a ``torch.where``.
    Under ``torch.compile`` pass the loss as a tensor: a Python float is a constant to dynamo, and a
    new one would recompile the step.

    Args:
        mode: ``"min"`` (the loss should fall) or ``"max"`` (a metric that should rise).
        factor: the multiplier applied to the scale at a reduction, in [0, 1).
        patience: decisions without improvement tolerated before a reduction, an int >= 0.
        threshold: how much better than the best a value must be to count as an improvement, >= 0.
        threshold_mode: ``"rel"`` (relative to the best) or ``"abs"``.
        cooldown: decisions after a reduction during which bad ones are not counted, an int >= 0.
        min_scale: the smallest scale, >= 0 (torch's ``min_lr / base_lr``).
        eps: reductions of the scale by no more than this are skipped, >= 0 (torch's ``eps / base_lr``).
        accumulation_size: updates whose losses are averaged per decision, an int >= 1.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0])}
        >>> tx = ft.chain(ft.sgd(lr=0.1), ft.reduce_on_plateau(factor=0.5, patience=0))
        >>> state = tx.init(params)
        >>> for loss in [1.0, 2.0, 2.0]:  # the second loss is worse than the first: halve
        ...     updates, state = tx.update({"w": torch.tensor([1.0])}, state, params, value=loss)
        >>> state[1].scale
        tensor(0.2500, dtype=torch.float64)

    References:
        ``torch.optim.lr_scheduler.ReduceLROnPlateau``; optax ``contrib.reduce_on_plateau``.
    """
    _validate.one_of("reduce_on_plateau", "mode", mode, ("min", "max"))
    _validate.one_of("reduce_on_plateau", "threshold_mode", threshold_mode, ("rel", "abs"))
    _validate.in_range("reduce_on_plateau", "factor", factor, 0.0, 1.0, high_open=True)
    _validate.integer("reduce_on_plateau", "patience", patience, 0)
    _validate.in_range("reduce_on_plateau", "threshold", threshold, 0.0)
    _validate.integer("reduce_on_plateau", "cooldown", cooldown, 0)
    _validate.in_range("reduce_on_plateau", "min_scale", min_scale, 0.0)
    _validate.in_range("reduce_on_plateau", "eps", eps, 0.0)
    _validate.integer("reduce_on_plateau", "accumulation_size", accumulation_size, 1)

    def is_better(value: Tensor, best: Tensor) -> Tensor:
        # torch's _is_better, with the same float64 arithmetic (its values are Python floats).
        if mode == "min":
            return value < (best * (1.0 - threshold) if threshold_mode == "rel" else best - threshold)
        return value > (best * (threshold + 1.0) if threshold_mode == "rel" else best + threshold)

    def init(params):
        count = step_count(params)
        f64 = {"dtype": torch.float64, "device": count.device}
        return ReduceOnPlateauState(
            scale=torch.ones((), **f64),
            best=torch.full((), math.inf if mode == "min" else -math.inf, **f64),
            num_bad_epochs=count.clone(),
            cooldown_counter=count.clone(),
            count=count,
            accumulated_value=torch.zeros((), **f64),
        )

    def update(updates, state, params=None, **extra):
        if extra.get("value") is None:
            raise ValueError("reduce_on_plateau needs the loss: call update(updates, state, params, value=loss)")
        # The scale decided by the losses so far; this step's loss decides the next one.
        scaled = _tree.scale(updates, state.scale)

        value = torch.as_tensor(extra["value"]).to(dtype=torch.float64, device=state.best.device).reshape(())
        accumulated = state.accumulated_value + value
        decide = (state.count + 1) % accumulation_size == 0
        current = accumulated / accumulation_size

        better = is_better(current, state.best)
        best = torch.where(better, current, state.best)
        num_bad_epochs = torch.where(better, 0, state.num_bad_epochs + 1)
        in_cooldown = state.cooldown_counter > 0
        cooldown_counter = torch.where(in_cooldown, state.cooldown_counter - 1, state.cooldown_counter)
        num_bad_epochs = torch.where(in_cooldown, 0, num_bad_epochs)  # bad epochs in cooldown are ignored

        reduce = num_bad_epochs > patience
        reduced = torch.clamp(state.scale * factor, min=min_scale)
        scale = torch.where(reduce & (state.scale - reduced > eps), reduced, state.scale)
        cooldown_counter = torch.where(reduce, cooldown, cooldown_counter)
        num_bad_epochs = torch.where(reduce, 0, num_bad_epochs)

        keep = ~decide  # between decisions only the loss sum and the count move
        return scaled, ReduceOnPlateauState(
            scale=torch.where(keep, state.scale, scale),
            best=torch.where(keep, state.best, best),
            num_bad_epochs=torch.where(keep, state.num_bad_epochs, num_bad_epochs),
            cooldown_counter=torch.where(keep, state.cooldown_counter, cooldown_counter),
            count=state.count + 1,
            accumulated_value=torch.where(keep, accumulated, 0.0),
        )

    return GradientTransformation(init, update)
