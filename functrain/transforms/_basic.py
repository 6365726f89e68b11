"""Stateless and momentum building blocks: scale, learning rates, weight decay, trace."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _tree, _validate
from .._hoist import hoist
from ..base import (
    GradientTransformation,
    Params,
    Schedule,
    empty_init,
    register_state,
    require_params,
    step_count,
)


def scale(step_size: float | Tensor) -> GradientTransformation:
    """Multiplies updates by a constant: ``u <- step_size * u``."""

    def update(updates, state, params=None, **extra):
        return _tree.scale(updates, step_size), state

    return GradientTransformation(empty_init, update)


@register_state
class ScaleByScheduleState(NamedTuple):
    count: Tensor  # updates done so far


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    """Multiplies updates by ``step_size_fn(count)``, where ``count`` is the number of updates done."""

    def init(params):
        return ScaleByScheduleState(count=step_count(params))

    def update(updates, state, params=None, **extra):
        factor = hoist(step_size_fn(state.count))
        return _tree.scale(updates, factor), ScaleByScheduleState(count=state.count + 1)

    return GradientTransformation(init, update)


def scale_by_learning_rate(
    learning_rate: float | Tensor | Schedule, *, flip_sign: bool = True
) -> GradientTransformation:
    """Multiplies updates by ``-learning_rate`` (a descent step), or by ``+learning_rate``.

    A callable learning rate is a schedule of the update count.
    """
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * learning_rate(count))
    return scale(sign * learning_rate)


def add_decayed_weights(weight_decay: float | Tensor = 0.0, mask: Any = None) -> GradientTransformation:
    """Adds ``weight_decay * params`` to the updates (L2 regularisation, or decoupled decay when
    placed after the adaptive scaling and before the learning rate, as in AdamW).

    Args:
        weight_decay: the decay coefficient, ``>= 0`` (a float or a 0-d tensor).
        mask: which params decay: ``None`` (all), a pytree of bools with the params' structure, or a
            function ``(name, tensor) -> bool`` of the dotted name (as ``ft.masked``'s mask). The
            others' updates pass through unchanged, as in a torch.optim param group with
            ``weight_decay=0``.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(2, 2), "bias": torch.ones(2)}
        >>> tx = ft.transforms.add_decayed_weights(0.1, mask=lambda name, p: p.ndim >= 2)
        >>> updates, _ = tx.update({"w": torch.zeros(2, 2), "bias": torch.zeros(2)}, tx.init(params), params)
        >>> updates["w"][0], updates["bias"]
        (tensor([0.1000, 0.1000]), tensor([0., 0.]))
    """
    _validate.in_range("add_decayed_weights", "weight_decay", weight_decay, 0.0)

    def update(updates, state, params=None, **extra):
        require_params("add_decayed_weights", params)
        if mask is None:
            return _tree.add_scaled(updates, params, weight_decay), state
        # Decay the selected leaves as one (foreach-able) dict; the rest pass through.
        assigned = _tree.mask_leaves(params, mask, "add_decayed_weights")
        grouped_updates = _tree.group_by_label(updates, assigned, (True, False))
        decayed = _tree.group_by_label(params, assigned, (True, False))[True]
        grouped_updates[True] = _tree.add_scaled(grouped_updates[True], decayed, weight_decay)
        return _tree.ungroup(grouped_updates, assigned, updates), state

    return GradientTransformation(empty_init, update)


@register_state
class TraceState(NamedTuple):
    count: Tensor
    trace: Params


def trace(decay: float | Tensor, nesterov: bool = False, dampening: float | Tensor = 0.0) -> GradientTransformation:
    """Momentum, as torch.optim.SGD computes it.

    ``t <- decay * t + (1 - dampening) * g`` (the first step sets ``t <- g``, without dampening);
    the update is ``t``, or ``g + decay * t`` with ``nesterov``. With ``dampening=0`` this is optax's
    ``trace``.
    """

    def init(params):
        return TraceState(count=step_count(params), trace=_tree.zeros_like(params))

    def update(updates, state, params=None, **extra):
        # The trace starts at zero, so `decay * t` vanishes on the first step and only the
        # gradient's weight needs the first-step exception: 1 on step one, 1 - dampening after.
        if isinstance(dampening, float) and dampening == 0.0:
            grad_weight = 1.0
        else:
            grad_weight = torch.where(state.count == 0, 1.0, 1.0 - torch.as_tensor(dampening, dtype=torch.float64))
        if _tree.fast_path_ok(updates):
            new_trace, out = _trace_foreach(updates, state.trace, decay, grad_weight, nesterov)
        else:
            new_trace = _tree.map(
                lambda t, g: t * _tree.scalar_for(decay, t) + g * _tree.scalar_for(grad_weight, g), state.trace, updates
            )
            out = (
                _tree.map(lambda g, t: g + t * _tree.scalar_for(decay, t), updates, new_trace)
                if nesterov
                else new_trace
            )
        return out, TraceState(count=state.count + 1, trace=new_trace)

    return GradientTransformation(init, update)


def _trace_foreach(updates, trace_tree, decay, grad_weight, nesterov):
    def step(gs, ts):
        new = torch._foreach_mul(ts, _tree.scalar_for(decay, ts[0]))
        weight = _tree.scalar_for(grad_weight, gs[0])
        if isinstance(weight, Tensor):
            torch._foreach_add_(new, torch._foreach_mul(gs, weight))
        else:
            torch._foreach_add_(new, gs, alpha=weight)
        if not nesterov:
            return new, new
        out = torch._foreach_mul(new, _tree.scalar_for(decay, ts[0]))
        torch._foreach_add_(out, gs)
        return new, out

    return _tree.foreach_map(step, updates, trace_tree)


def descend_with_decoupled_decay(learning_rate: float | Tensor, weight_decay: float | Tensor) -> GradientTransformation:
    """``u <- -learning_rate * (u + weight_decay * params)``: AdamW's last line.

    Equal to ``chain(add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))``
    but written in one pass into one new tensor per leaf: on a large model each avoided
    allocation is a fresh, page-faulting buffer the size of the parameters.
    """

    def update(updates, state, params=None, **extra):
        require_params("descend_with_decoupled_decay", params)
        return _tree.scaled_sum(updates, -learning_rate, params, -learning_rate * weight_decay), state

    return GradientTransformation(empty_init, update)
