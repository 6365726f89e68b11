"""lookahead: k fast steps forward, one step back towards slow weights."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree, _validate
from ..base import GradientTransformation, OptState, Params, register_state, require_params, state_check, step_count


@register_state
class LookaheadState(NamedTuple):
    count: Tensor  # fast (inner) steps done so far, 0-d int64
    slow: Params  # the slow weights, phi
    inner_state: OptState


def lookahead(tx: GradientTransformation, sync_period: int = 6, alpha: float | Tensor = 0.5) -> GradientTransformation:
    r"""Lookahead: ``tx`` takes fast steps; every ``sync_period`` steps the weights go back towards slow weights.

    With slow weights :math:`\phi` (the params at ``init``) and fast weights :math:`\theta` (the
    params), each update computes the fast step :math:`\theta' = \theta + \mathrm{tx}(g)`; on every
    ``sync_period``-th update it also syncs:

    .. math::
        \phi \leftarrow \phi + \alpha (\theta' - \phi), \qquad \theta' \leftarrow \phi,

    and returns the update :math:`\theta' - \theta` either way, so the params stay the user's own
    tree (optax's ``lookahead`` instead makes the params a ``LookaheadParams`` pair). ``tx``'s
    state (momenta) carries across syncs, as in the paper's experiments. The state holds one
    params-sized buffer (the slow weights) beside ``tx``'s. The sync is chosen with
    ``torch.where``, so a compiled step is one graph. After a sync, ``apply_updates`` gives
    :math:`\theta + (\phi - \theta)`, which is :math:`\phi` up to one rounding.

    Args:
        tx: the inner ("fast") optimiser.
        sync_period: fast steps per sync, :math:`k`, an int >= 1.
        alpha: the slow step size :math:`\alpha` in [0, 1] (1 keeps the fast weights; 0 resets to the slow ones),
            a float or a 0-d tensor (``ft.inject_hyperparams(ft.lookahead)(tx, alpha=schedule)`` schedules it).

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([0.0])}
        >>> tx = ft.lookahead(ft.sgd(lr=1.0), sync_period=2, alpha=0.5)
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([-1.0])}, state, params)
        ...     params = ft.apply_updates(params, updates)
        >>> params["w"]  # fast weights reached 2.0; synced back to 0 + 0.5 * (2 - 0)
        tensor([1.])

    References:
        Zhang, Lucas, Hinton and Ba, 2019, "Lookahead Optimizer: k steps forward, 1 step back"
        (Algorithm 1). optax ``lookahead``.
    """
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"lookahead: tx must be a GradientTransformation, got {type(tx).__name__}")
    _validate.integer("lookahead", "sync_period", sync_period, 1)
    _validate.not_a_schedule("lookahead", "alpha", alpha)
    _validate.in_range("lookahead", "alpha", alpha, 0.0, 1.0)

    def init(params):
        return LookaheadState(step_count(params), _tree.map(torch.clone, params), tx.init(params))

    check = state_check("ft.lookahead", init, LookaheadState)

    def update(updates, state, params=None, **extra):
        check(updates, state, params)
        require_params("lookahead", params)
        fast_updates, inner_state = tx.update(updates, state.inner_state, params, **extra)
        fast = _tree.add(params, fast_updates)  # exactly what apply_updates would produce
        sync = (state.count + 1) % sync_period == 0
        synced = _tree.map(lambda s, f: s + _tree.scalar_for(alpha, s) * (f - s), state.slow, fast)
        out = _tree.map(lambda p, u, s: torch.where(sync, (s - p).to(u.dtype), u), params, fast_updates, synced)
        return out, LookaheadState(state.count + 1, _tree.where(sync, synced, state.slow), inner_state)

    # Declined: on a sync step the update is ``slow - params``, and ``params + (slow - params)`` is
    # not bitwise ``slow``; only the reference update + apply gives the documented numbers.
    return GradientTransformation(init, update, update_and_apply=None)
