"""Learning-rate-free Adam: a global step size ``d`` estimated from the whole trajectory.

Prodigy (Mishchenko & Defazio, 2023) and D-Adaptation (Defazio & Mishchenko, 2023) run Adam with a
step size ``d * lr`` in which ``d`` starts at a tiny ``d0`` and grows towards an estimate of the
distance from the initial point to the solution. That estimate is a ratio of two sums over *every*
element of *every* parameter: here, a reduction over the whole tree, computed in float64 as the
reference packages accumulate Python floats. A sharded (DTensor) parameter's sums are reduced over
its shards by DTensor ops, so the estimate, and every step, equals one process's.

The reference packages keep ``d`` per parameter group but compute it from all groups together,
skipping a step entirely (no parameter moves, ``d`` and the step counter stay) when the denominator
is zero: no gradient signal yet, or a learning rate of 0. Both are reproduced without a host read,
with ``torch.where``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _sharding, _tree
from .._hoist import hoist
from ..base import GradientTransformation, Params, register_state, require_params, step_count

cast = _tree.scalar_for

# ----------------------------------------------------------------------------- shared pieces


def _float64(value: float | Tensor, like: Tensor) -> Tensor:
    """A 0-d float64 tensor of ``value`` on ``like``'s device: the estimate's scalars are kept in
    float64, as the reference packages keep them in Python floats."""
    return torch.as_tensor(value, dtype=torch.float64, device=like.device).reshape(())


def _scalar(value: Tensor, like: Tensor) -> Tensor:
    """A float64 per-step scalar for an op over ``like`` (rounded to its dtype, as a Python float
    passed to an in-place op of the reference is)."""
    return value.to(device=like.device, dtype=like.dtype)


def _totals(like: Tensor, *per_leaf: Params) -> list[Tensor]:
    """The float64 total of each tree of per-leaf 0-d sums (``x.sum()`` of each leaf), as plain
    0-d tensors on every rank; zero for an empty tree.

    Each leaf's sum runs in its own dtype and is then added in float64, as the reference packages
    add ``torch.dot(...).item()`` into a Python float. A sharded DTensor's sum is pending over its
    shards; those of every tree are all-reduced together, one collective per placement and dtype
    (not one per tensor), before the float64 totals are taken.
    """
    columns = [_tree.leaves(tree) for tree in per_leaf]
    flat = [x for column in columns for x in column]
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(flat):
        if _sharding.is_dtensor(x):
            groups.setdefault((x.device_mesh, tuple(x.placements), x.dtype), []).append(i)
    for indices in groups.values():
        reduced = torch.stack([flat[i] for i in indices]).full_tensor()
        for i, value in zip(indices, reduced.unbind()):
            flat[i] = value
    totals, start = [], 0
    for column in columns:
        sums = flat[start : start + len(column)]
        start += len(column)
        if not sums:
            totals.append(torch.zeros((), dtype=torch.float64, device=like.device))
        else:
            totals.append(torch.stack([x.to(device=like.device, dtype=torch.float64) for x in sums]).sum())
    return totals


def _python_max(a: Tensor, b: Tensor) -> Tensor:
    """``max(a, b)`` as Python computes it (``b`` only when ``b > a``; NaN never wins)."""
    return torch.where(b > a, b, a)


def _python_min(a: Tensor, b: Tensor) -> Tensor:
    """``min(a, b)`` as Python computes it (``b`` only when ``b < a``)."""
    return torch.where(b < a, b, a)


def _bias_correction(k: Tensor, b1, b2, use_bias_correction: bool) -> Tensor | float:
    """Adam's bias correction folded into the step size: ``sqrt(1 - b2^(k+1)) / (1 - b1^(k+1))``."""
    if not use_bias_correction:
        return 1.0
    t = (k + 1).to(torch.float64)
    return (1 - b2**t) ** 0.5 / (1 - b1**t)


def _positive(lr: float | Tensor) -> bool | Tensor:
    """Whether ``lr > 0``: a Python bool for a number (decided once), a 0-d bool tensor otherwise."""
    return lr > 0 if isinstance(lr, Tensor) else bool(lr > 0)


def _live(denominator: Tensor, moving: bool | Tensor) -> Tensor:
    """Whether the step is taken: the packages return early, before moving anything but the moments,
    when the estimate's denominator is 0 (no gradient signal yet). With lr 0 they skip the moments
    too and add nothing to the denominator, so that step is skipped whatever the old sums were."""
    live = denominator != 0
    return live if moving is True else live & moving


def _select(condition: bool | Tensor, a: Any, b: Any) -> Any:
    """``a`` where ``condition`` holds, else ``b``: a Python choice for a bool, ``torch.where`` leaf by
    leaf for a tensor (no host read)."""
    if isinstance(condition, bool):
        return a if condition else b
    return _tree.where(condition, a, b)


# ----------------------------------------------------------------------------- Prodigy


@register_state
class ScaleByProdigyState(NamedTuple):
    k: Tensor  # steps taken, 0-d int64 (a skipped step, with no gradient signal, does not count)
    d: Tensor  # the step-size estimate, 0-d float64, d0 at first
    d_max: Tensor  # the largest estimate so far, 0-d float64
    d_numerator: Tensor  # the running numerator of the estimate, 0-d float64
    exp_avg: Params  # first moment, scaled by d as it was at each step
    exp_avg_sq: Params  # second moment, scaled by d^2
    s: Params  # running sum of d-weighted gradients (sliced when slice_p > 1)
    p0: Params  # the initial parameters (sliced when slice_p > 1)


def _slice(t: Tensor, slice_p: int) -> Tensor:
    """Every ``slice_p``-th element of ``t`` flattened (``t`` itself for 1). A sharded tensor is
    sliced whole (the elements must be the ones one process takes) and sharded again by rows."""
    if slice_p == 1:
        return t
    return _sharding.on_whole(lambda whole: whole.reshape(-1)[::slice_p], t)


def scale_by_prodigy(
    learning_rate: float | Tensor = 1.0,
    betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
    beta3: float | Tensor | None = None,
    eps: float | Tensor = 1e-8,
    weight_decay: float | Tensor = 0.0,
    use_bias_correction: bool = False,
    safeguard_warmup: bool = False,
    d0: float | Tensor = 1e-6,
    d_coef: float | Tensor = 1.0,
    growth_rate: float | Tensor = float("inf"),
    slice_p: int = 1,
) -> GradientTransformation:
    r"""Prodigy's step (Mishchenko & Defazio, 2023), as ``prodigyopt.Prodigy`` 1.1.2 computes it: the
    update to add to the parameters, descent sign and learning rate included (the estimate itself
    depends on the learning rate). Needs ``params``.

    With :math:`\gamma` the learning rate, :math:`\hat\gamma_k = d_k \gamma \rho_k` (:math:`\rho_k`
    Adam's bias correction :math:`\sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})`, or 1) and
    :math:`\tilde g` every ``slice_p``-th element of :math:`g`:

    .. math::
        m &\leftarrow \beta_1 m + d_k(1-\beta_1) g, \qquad v \leftarrow \beta_2 v + d_k^2(1-\beta_2) g^2\\
        s &\leftarrow \beta_3 s + \tfrac{d_k}{d_0} \hat\gamma_k \tilde g
            \quad(\tfrac{d_k}{d_0} d_k \tilde g \text{ with safeguard\_warmup})\\
        r_{k+1} &= \beta_3 r_k + \tfrac{d_k}{d_0}\hat\gamma_k \langle \tilde g, \tilde\theta_0 - \tilde\theta\rangle,
            \qquad \hat d = c\, r_{k+1} / \lVert s\rVert_1\\
        d_{k+1} &= \min(d^{\max}_{k+1}, \eta\, d'_k), \quad d^{\max}_{k+1} = \max(d^{\max}_k, \hat d), \quad
            d'_k = \max(d_k, \hat d) \text{ while } d_k = d_0 \text{ else } d_k\\
        u &= -\hat\gamma_k \frac{m}{\sqrt{v} + d_{k+1}\epsilon} - \hat\gamma_k \lambda \theta

    summed over every parameter (:math:`c` is ``d_coef``, :math:`\eta` ``growth_rate``,
    :math:`\lambda` the decoupled ``weight_decay``; :math:`\beta_1 = 0` steps along
    :math:`d_{k+1} g` instead of :math:`m`). When :math:`\lVert s\rVert_1 = 0` (no gradient signal,
    or :math:`\gamma = 0`) nothing moves and :math:`k, d, r` stay, as in the package.

    Args:
        learning_rate: :math:`\gamma`, a multiplier of the estimated step size, ``>= 0``.
        betas: :math:`(\beta_1, \beta_2)`.
        beta3: :math:`\beta_3`, the decay of :math:`s` and :math:`r`; None for :math:`\sqrt{\beta_2}`.
        eps: :math:`\epsilon`, scaled by :math:`d` in the denominator.
        weight_decay: :math:`\lambda`, decoupled (an L2 penalty goes before, in the gradient).
        use_bias_correction: Adam's bias correction in :math:`\hat\gamma`.
        safeguard_warmup: leave :math:`\gamma` out of :math:`s` (for warm-up schedules).
        d0: :math:`d_0`, the initial estimate.
        d_coef: :math:`c`.
        growth_rate: :math:`\eta`, the largest factor by which :math:`d` grows in a step.
        slice_p: estimate from every ``slice_p``-th element only (:math:`s, \theta_0` that much smaller).
    """
    b1, b2 = betas
    b3 = beta3
    if b3 is None:  # the package's math.sqrt for a number
        b3 = b2.sqrt() if isinstance(b2, Tensor) else math.sqrt(b2)

    def init(params):
        sliced = _tree.map(lambda p: _slice(p, slice_p), params)
        count = step_count(params)
        scalar = lambda value: _float64(value, count)  # noqa: E731
        return ScaleByProdigyState(
            k=count,
            d=scalar(d0),
            d_max=scalar(d0),
            d_numerator=scalar(0.0),
            exp_avg=_tree.zeros_like(params),
            exp_avg_sq=_tree.zeros_like(params),
            s=_tree.zeros_like(sliced),
            p0=_tree.map(lambda p: p.detach().clone(), sliced),
        )

    def update(updates, state, params=None, **extra):
        require_params("scale_by_prodigy", params)
        d = state.d
        # The reference's Python-float scalars, in its order of operations.
        dlr = d * learning_rate * _bias_correction(state.k, b1, b2, use_bias_correction)
        first = d * (1 - b1)
        second = d * d * (1 - b2)
        growth = (d / d0) * (d if safeguard_warmup else dlr)
        dlr, first, second, growth = hoist(dlr, first, second, growth)  # not d: a state input

        def moments(g, p, m, v, s, p0):
            sliced_g = _slice(g, slice_p)
            dot = (sliced_g * (p0 - _slice(p, slice_p))).sum()
            m = m * cast(b1, m) + g * _scalar(first, g)
            v = v * cast(b2, v) + g * _scalar(second, g) * g
            s = s * cast(b3, s) + sliced_g * _scalar(growth, sliced_g)
            return m, v, s, dot, s.abs().sum()

        m, v, s, dots, l1s = _tree.map_many(
            moments, updates, params, state.exp_avg, state.exp_avg_sq, state.s, state.p0, n=5
        )
        dot, d_denom = _totals(d, dots, l1s)
        d_numerator = state.d_numerator * b3 + (d / d0) * dlr * dot
        d_hat = d_coef * d_numerator / d_denom
        d_max = _python_max(state.d_max, d_hat)
        d_new = _python_min(d_max, torch.where(d == d0, _python_max(d, d_hat), d) * growth_rate)
        moving = _positive(learning_rate)
        live = _live(d_denom, moving)
        # A skipped step is a step of size 0 (d kept: the skipped estimate may be 0/0).
        rate, d_step = torch.where(live, dlr, 0.0), torch.where(live, d_new, d)
        d_new, d_max, d_numerator, rate, d_step = hoist(d_new, d_max, d_numerator, rate, d_step)

        def step(g, p, m, v):
            denom = v.sqrt() + _scalar(d_step * eps, v)
            direction = m if _static(b1, lambda b: b > 0) else _direction_without_momentum(b1, m, g, d_step)
            return _decoupled(p, (direction / denom) * _scalar(-rate, p), weight_decay, rate)

        out = _tree.map(step, updates, params, m, v)
        m, v, s = _select(moving, (m, v, s), (state.exp_avg, state.exp_avg_sq, state.s))
        new_state = ScaleByProdigyState(
            k=torch.where(live, state.k + 1, state.k),
            d=torch.where(live, d_new, state.d),
            d_max=torch.where(live, d_max, state.d_max),
            d_numerator=torch.where(live, d_numerator, state.d_numerator),
            exp_avg=m,
            exp_avg_sq=v,
            s=s,
            p0=state.p0,
        )
        return out, new_state

    return GradientTransformation(init, update)


def _decoupled(p: Tensor, step: Tensor, weight_decay, dlr: Tensor) -> Tensor:
    """The update that takes ``p`` to ``(p - weight_decay * dlr * p) + step``, the packages' decoupled
    decay: in place first, then the step from the decayed point.

    That is two roundings, which an update added once cannot repeat; so the update is the difference
    of the two points, exact for a step much smaller than the parameter (Sterbenz), and ``p + update``
    is the package's point. It matters: Prodigy's estimate, through ``<g, p0 - p>``, magnifies one
    ulp of ``p`` early in training (a 3% difference after 25 float32 steps when added once)."""
    if _static(weight_decay, lambda w: w == 0):
        return step
    decayed = p - p * _scalar(weight_decay * dlr, p)
    return (decayed + step) - p


def _static(value: Any, test: Any) -> bool | None:
    """``test(value)`` for a Python number, None for a tensor (decided at run time)."""
    return None if isinstance(value, Tensor) else bool(test(value))


def _direction_without_momentum(b1, m: Tensor, g: Tensor, d_new: Tensor) -> Tensor:
    """Prodigy with ``beta1 = 0`` steps along ``d_{k+1} g`` rather than its (``d_k``-scaled) first
    moment; for a tensor ``beta1`` the choice is made with ``torch.where``."""
    without = g * _scalar(d_new, g)
    if not isinstance(b1, Tensor):
        return without
    return torch.where(b1.to(g.device) > 0, m, without)


# ----------------------------------------------------------------------------- D-Adaptation (Adam)


@register_state
class ScaleByDAdaptAdamState(NamedTuple):
    k: Tensor  # steps taken, 0-d int64 (a skipped step, with no gradient signal, does not count)
    d: Tensor  # the step-size estimate, 0-d float64, d0 at first
    numerator_weighted: Tensor  # the running numerator of the estimate, 0-d float64
    exp_avg: Params  # first moment of the d-scaled gradients
    exp_avg_sq: Params  # second moment
    s: Params  # running (EMA) sum of d-weighted gradients


def scale_by_dadapt_adam(
    learning_rate: float | Tensor = 1.0,
    betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
    eps: float | Tensor = 1e-8,
    weight_decay: float | Tensor = 0.0,
    use_bias_correction: bool = False,
    d0: float | Tensor = 1e-6,
    growth_rate: float | Tensor = float("inf"),
) -> GradientTransformation:
    r"""D-Adapted Adam's step (Defazio & Mishchenko, 2023), as ``dadaptation.DAdaptAdam`` 3.2 computes
    it: the update to add to the parameters, descent sign and learning rate included. Needs ``params``.

    With :math:`\hat\gamma_k = d_k \gamma \rho_k` (:math:`\rho_k` Adam's bias correction, or 1) and
    :math:`\sqrt{\beta_2}` the decay of the estimate's sums:

    .. math::
        a_k &= \hat\gamma_k \Big\langle g, \frac{s}{\sqrt{v} + \epsilon} \Big\rangle \quad(\text{old } s, v),
            \qquad r_{k+1} = \sqrt{\beta_2}\, r_k + (1-\sqrt{\beta_2})\, a_k\\
        m &\leftarrow \beta_1 m + \hat\gamma_k(1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
            \quad s \leftarrow \sqrt{\beta_2} s + \hat\gamma_k (1-\sqrt{\beta_2}) g\\
        \hat d &= \frac{r_{k+1}}{(1-\sqrt{\beta_2}) \lVert s\rVert_1}, \qquad
            d_{k+1} = \max(d_k, \min(\hat d, \eta\, d_k))\\
        u &= -\frac{m}{\sqrt{v} + \epsilon} - \hat\gamma_k \lambda \theta

    summed over every parameter (:math:`\eta` is ``growth_rate``, :math:`\lambda` the decoupled
    ``weight_decay``). When :math:`\lVert s\rVert_1 = 0` nothing moves and :math:`k, d, r` stay.

    Args:
        learning_rate: :math:`\gamma`, a multiplier of the estimated step size, ``>= 0``.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon` in the denominator.
        weight_decay: :math:`\lambda`, decoupled (an L2 penalty goes before, in the gradient).
        use_bias_correction: Adam's bias correction in :math:`\hat\gamma`.
        d0: :math:`d_0`, the initial estimate.
        growth_rate: :math:`\eta`, the largest factor by which :math:`d` grows in a step.
    """
    b1, b2 = betas

    def init(params):
        count = step_count(params)
        zeros = _tree.zeros_like
        return ScaleByDAdaptAdamState(
            k=count,
            d=_float64(d0, count),
            numerator_weighted=_float64(0.0, count),
            exp_avg=zeros(params),
            exp_avg_sq=zeros(params),
            s=zeros(params),
        )

    def update(updates, state, params=None, **extra):
        require_params("scale_by_dadapt_adam", params)
        d = state.d
        sqrt_b2 = b2**0.5
        # The reference's Python-float scalars, in its order of operations.
        dlr = d * learning_rate * _bias_correction(state.k, b1, b2, use_bias_correction)
        first = dlr * (1 - b1)
        growth = dlr * (1 - sqrt_b2)
        dlr, first, growth = hoist(dlr, first, growth)

        def moments(g, m, v, s):
            dot = (g * (s / (v.sqrt() + cast(eps, v)))).sum()
            m = m * cast(b1, m) + g * _scalar(first, g)
            v = v * cast(b2, v) + g * cast(1 - b2, g) * g
            s = s * cast(sqrt_b2, s) + g * _scalar(growth, g)
            return m, v, s, dot, s.abs().sum()

        m, v, s, dots, l1s = _tree.map_many(moments, updates, state.exp_avg, state.exp_avg_sq, state.s, n=5)
        dot, sk_l1 = _totals(d, dots, l1s)
        numerator_weighted = sqrt_b2 * state.numerator_weighted + (1 - sqrt_b2) * (dlr * dot)
        d_hat = numerator_weighted / ((1 - sqrt_b2) * sk_l1)
        d_new = _python_max(d, _python_min(d_hat, d * growth_rate))
        moving = _positive(learning_rate)
        live = _live(sk_l1, moving)
        # A skipped step is a step of size 0: the direction times -1 or 0, the decay's rate dlr or 0.
        sign, rate = torch.where(live, -1.0, 0.0), torch.where(live, dlr, 0.0)
        d_new, numerator_weighted, sign, rate = hoist(d_new, numerator_weighted, sign, rate)

        def step(p, m, v):
            return _decoupled(p, (m / (v.sqrt() + cast(eps, v))) * _scalar(sign, m), weight_decay, rate)

        out = _tree.map(step, params, m, v)
        m, v, s = _select(moving, (m, v, s), (state.exp_avg, state.exp_avg_sq, state.s))
        new_state = ScaleByDAdaptAdamState(
            k=torch.where(live, state.k + 1, state.k),
            d=torch.where(live, d_new, state.d),
            numerator_weighted=torch.where(live, numerator_weighted, state.numerator_weighted),
            exp_avg=m,
            exp_avg_sq=v,
            s=s,
        )
        return out, new_state

    return GradientTransformation(init, update)
