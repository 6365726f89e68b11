"""ema_params: an exponential moving average of the parameters, kept in the optimiser state."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree, _validate
from ..base import (
    GradientTransformation,
    Hyperparameter,
    OptState,
    Params,
    register_state,
    require_params,
    state_check,
    step_count,
    value_at,
)
from ._common import find_one_state


@register_state
class EmaParamsState(NamedTuple):
    count: Tensor  # updates averaged so far (AveragedModel's ``n_averaged``), 0-d int64
    ema: Params  # the averaged params


def ema_params(decay: Hyperparameter = 0.999) -> GradientTransformation:
    r"""Keeps an exponential moving average (EMA) of the parameters; updates pass through unchanged.

    Place it last in a chain, so that ``params + updates`` are the params after this step
    (:math:`\theta_{t+1}`). Each update then sets

    .. math::
        \bar\theta \leftarrow \theta_1 \text{ on the first update}, \qquad
        \bar\theta \leftarrow \mathrm{lerp}(\bar\theta, \theta_{t+1}, 1 - \text{decay}) \text{ after},

    which is ``torch.optim.swa_utils.AveragedModel(model,
    multi_avg_fn=get_ema_multi_avg_fn(decay))`` with ``update_parameters(model)`` called after
    every optimiser step: that copies the params while ``n_averaged == 0`` and lerps after. Like
    ``AveragedModel``, which starts as a deep copy of the model, ``init`` stores a copy of the
    initial params, so the average reads as the initial params before any update. Read it with
    :func:`ema_params_of`. Buffers (BatchNorm statistics) are not averaged, as with
    ``AveragedModel``'s default ``use_buffers=False``.

    Args:
        decay: the weight of the old average, in [0, 1] (float, 0-d tensor or schedule of the update count).

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([0.0])}
        >>> tx = ft.chain(ft.sgd(lr=1.0), ft.ema_params(decay=0.5))
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([-1.0])}, state, params)
        ...     params = ft.apply_updates(params, updates)
        >>> params["w"], ft.ema_params_of(state)["w"]
        (tensor([2.]), tensor([1.5000]))

    References:
        ``torch.optim.swa_utils.AveragedModel`` and ``get_ema_multi_avg_fn``; Polyak and Juditsky,
        1992, "Acceleration of stochastic approximation by averaging".
    """
    _validate.in_range("ema_params", "decay", decay, 0.0, 1.0)

    def init(params):
        return EmaParamsState(count=step_count(params), ema=_tree.map(torch.clone, params))

    check = state_check("ft.ema_params", init, EmaParamsState)

    def update(updates, state, params=None, **extra):
        check(updates, state, params)
        require_params("ema_params", params)
        new_params = _tree.add(params, updates)  # exactly what apply_updates will produce
        weight = 1 - value_at(decay, state.count)
        first = state.count == 0  # AveragedModel copies then, rather than lerping with weight 1
        if _tree.fast_path_ok(state.ema):
            # One multi-tensor lerp per (device, dtype) group, its weight 1 on the first update:
            # lerp(e, p, 1) computes p - (p - e) * 0, which is p exactly for finite e (the copy).
            weight_now = torch.where(first, 1.0, torch.as_tensor(weight, dtype=torch.float64, device=first.device))

            def lerp(es, ps):
                if es[0].dtype in (torch.float16, torch.bfloat16) and not isinstance(weight, Tensor):
                    # A float weight in a half-precision lerp rounds differently from a tensor one: per leaf.
                    return ([torch.where(first, p, _lerp(e, p, weight)) for e, p in zip(es, ps)],)
                return (torch._foreach_lerp(es, ps, _tree.scalar_for(weight_now, es[0])),)

            return updates, EmaParamsState(count=state.count + 1, ema=_tree.foreach_map(lerp, state.ema, new_params)[0])
        ema = _tree.map(lambda e, p: torch.where(first, p, _lerp(e, p, weight)), state.ema, new_params)
        return updates, EmaParamsState(count=state.count + 1, ema=ema)

    # Declined: the EMA is of the parameters after the apply, which this transform computes itself;
    # it passes the updates on unchanged and has no faster pass to offer.
    return GradientTransformation(init, update, update_and_apply=None)


def _lerp(start: Tensor, end: Tensor, weight: float | Tensor) -> Tensor:
    """``torch.lerp`` as torch computes it for a Python-float weight: a tensor weight stays float32
    for bf16/fp16 leaves (rounding it to 8 bits would move the average), so those lerp in float32
    and round once, which is what the low-precision kernel (and ``_foreach_lerp``) does inside."""
    w = _tree.scalar_for(weight, start)
    if isinstance(w, Tensor) and w.dtype != start.dtype:
        return torch.lerp(start.float(), end.float(), w).to(start.dtype)
    return torch.lerp(start, end, w)


def ema_params_of(opt_state: OptState) -> Params:
    """The averaged params held by the one :func:`ema_params` state inside ``opt_state``.

    ``opt_state`` may be the ``EmaParamsState`` itself or any state holding exactly one (a chain,
    ``inject_hyperparams``, :func:`accumulate`, ...); nothing is copied. Under ``partition`` each
    group would hold its own average of its own params, so there put ``ema_params`` after the
    partition: ``chain(partition(...), ema_params(decay))``.

    Args:
        opt_state: a state holding exactly one :func:`ema_params` state.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.chain(ft.adam(lr=0.1), ft.ema_params(0.9))
        >>> ft.ema_params_of(tx.init({"w": torch.ones(2)}))
        {'w': tensor([1., 1.])}

    References:
        ``torch.optim.swa_utils.AveragedModel.module``, the model that holds the average there.
    """
    return find_one_state(opt_state, EmaParamsState, "ema_params_of", "ema_params").ema
