"""Step, exponential and warm-up style decays."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch import Tensor

from .. import _validate
from ..base import Schedule
from ._common import _as_count, _full, _int, _non_negative, _real

# ----------------------------------------------------------------------------- step decays


def step_lr(base_lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
    r"""Decays the learning rate by ``gamma`` every ``step_size`` steps, like ``torch.optim.lr_scheduler.StepLR``.

    .. math::
        \eta_t = \eta_0 \, \gamma^{\lfloor t / \text{step\_size} \rfloor}

    Args:
        base_lr: :math:`\eta_0`, the learning rate before the first decay (torch: the optimiser's lr).
        step_size: period of the decay, in optimiser steps (a positive int).
        gamma: multiplicative factor of each decay.

    Example:
        >>> import torch, functrain as ft
        >>> schedule = ft.schedules.step_lr(1.0, step_size=2, gamma=0.5)
        >>> [schedule(torch.tensor(t)).item() for t in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    """
    base_lr = _non_negative("step_lr", "base_lr", base_lr)
    step_size = _int("step_lr", "step_size", step_size, 1)
    gamma = _non_negative("step_lr", "gamma", gamma)

    def schedule(count: Tensor) -> Tensor:
        decays = torch.div(_as_count(count), step_size, rounding_mode="floor")
        return base_lr * gamma ** decays.to(torch.float64)

    return schedule


def multi_step_lr(base_lr: float, milestones: Iterable[int], gamma: float = 0.1) -> Schedule:
    r"""Decays the learning rate by ``gamma`` at each milestone, like ``torch.optim.lr_scheduler.MultiStepLR``.

    .. math::
        \eta_t = \eta_0 \, \gamma^{\#\{m \in \text{milestones} : m \le t\}}

    A milestone listed ``k`` times decays by :math:`\gamma^k` there (torch keeps milestones in a
    ``Counter``); their order does not matter.

    Args:
        base_lr: :math:`\eta_0`, the learning rate before the first milestone.
        milestones: step counts (non-negative ints) at which the learning rate decays.
        gamma: multiplicative factor of each decay.

    Example:
        >>> import torch, functrain as ft
        >>> schedule = ft.schedules.multi_step_lr(1.0, milestones=[2, 4, 4], gamma=0.5)
        >>> [schedule(torch.tensor(t)).item() for t in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.125, 0.125]
    """
    base_lr = _non_negative("multi_step_lr", "base_lr", base_lr)
    try:
        given = list(milestones)
    except TypeError:
        raise TypeError(f"multi_step_lr: milestones must be an iterable of ints, got {milestones!r}") from None
    counts = Counter(_int("multi_step_lr", "milestones", m, 0) for m in given)
    gamma = _non_negative("multi_step_lr", "gamma", gamma)
    # (milestone, multiplicity), unrolled into the graph: no table is copied to the device per call.
    steps = sorted(counts.items())

    def schedule(count: Tensor) -> Tensor:
        count = _as_count(count)
        decays = torch.zeros((), dtype=torch.int64, device=count.device)
        for milestone, times in steps:
            decays = decays + times * (count >= milestone).to(torch.int64)
        return base_lr * gamma ** decays.to(torch.float64)

    return schedule


def exponential_lr(base_lr: float, gamma: float) -> Schedule:
    r"""Decays the learning rate by ``gamma`` every step, like ``torch.optim.lr_scheduler.ExponentialLR``.

    .. math::
        \eta_t = \eta_0 \, \gamma^t

    Args:
        base_lr: :math:`\eta_0`, the learning rate of the first step.
        gamma: multiplicative factor of the decay per step.

    Example:
        >>> import torch, functrain as ft
        >>> schedule = ft.schedules.exponential_lr(1.0, gamma=0.5)
        >>> [schedule(torch.tensor(t)).item() for t in range(4)]
        [1.0, 0.5, 0.25, 0.125]
    """
    base_lr = _non_negative("exponential_lr", "base_lr", base_lr)
    gamma = _non_negative("exponential_lr", "gamma", gamma)

    def schedule(count: Tensor) -> Tensor:
        return base_lr * gamma ** _as_count(count).to(torch.float64)

    return schedule


# ----------------------------------------------------------------------------- warm-up style factors


def constant_lr(base_lr: float, factor: float = 1.0 / 3, total_iters: int = 5) -> Schedule:
    r"""Scales the learning rate by ``factor`` for ``total_iters`` steps, like ``torch.optim.lr_scheduler.ConstantLR``.

    .. math::
        \eta_t = \begin{cases} \eta_0 \cdot \text{factor} & t < \text{total\_iters} \\
                               (\eta_0 \cdot \text{factor}) \cdot (1 / \text{factor}) & t \ge \text{total\_iters}
                 \end{cases}

    The second value is computed as torch computes it (it may differ from :math:`\eta_0` in the last
    bit). With ``factor == 0`` torch divides by zero at ``total_iters``; here the rate becomes
    :math:`\eta_0` (torch's closed form).

    Args:
        base_lr: :math:`\eta_0`, the learning rate after the constant phase.
        factor: the scale during the first ``total_iters`` steps, in [0, 1].
        total_iters: number of scaled steps (a positive int).

    Example:
        >>> import torch, functrain as ft
        >>> schedule = ft.schedules.constant_lr(1.0, factor=0.5, total_iters=2)
        >>> [schedule(torch.tensor(t)).item() for t in range(4)]
        [0.5, 0.5, 1.0, 1.0]
    """
    base_lr = _non_negative("constant_lr", "base_lr", base_lr)
    factor = _real("constant_lr", "factor", factor)
    _validate.in_range("constant_lr", "factor", factor, 0.0, 1.0)
    total_iters = _int("constant_lr", "total_iters", total_iters, 1)
    scaled = base_lr * factor
    restored = scaled * (1.0 / factor) if factor != 0.0 else base_lr

    def schedule(count: Tensor) -> Tensor:
        count = _as_count(count)
        return torch.where(count < total_iters, _full(scaled, count), _full(restored, count))

    return schedule


def linear_lr(base_lr: float, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5) -> Schedule:
    r"""Scales the learning rate by a factor moving linearly from ``start_factor`` to ``end_factor``,
    like ``torch.optim.lr_scheduler.LinearLR``.

    .. math::
        \eta_t = \eta_0 \left(s + (e - s) \frac{\min(t, T)}{T}\right)

    with :math:`s` = ``start_factor``, :math:`e` = ``end_factor``, :math:`T` = ``total_iters``; the
    factor stays at :math:`e` after :math:`T` steps.

    Args:
        base_lr: :math:`\eta_0`, the learning rate the factors scale.
        start_factor: the factor of the first step, in (0, 1].
        end_factor: the factor from step ``total_iters`` on, in [0, 1].
        total_iters: number of steps the factor takes to reach ``end_factor`` (a positive int).

    Example:
        >>> import torch, functrain as ft
        >>> schedule = ft.schedules.linear_lr(1.0, start_factor=0.25, end_factor=1.0, total_iters=3)
        >>> [schedule(torch.tensor(t)).item() for t in range(5)]
        [0.25, 0.5, 0.75, 1.0, 1.0]
    """
    base_lr = _non_negative("linear_lr", "base_lr", base_lr)
    start_factor = _real("linear_lr", "start_factor", start_factor)
    _validate.in_range("linear_lr", "start_factor", start_factor, 0.0, 1.0, low_open=True)
    end_factor = _real("linear_lr", "end_factor", end_factor)
    _validate.in_range("linear_lr", "end_factor", end_factor, 0.0, 1.0)
    total_iters = _int("linear_lr", "total_iters", total_iters, 1)
    slope = end_factor - start_factor

    def schedule(count: Tensor) -> Tensor:
        done = _as_count(count).clamp(max=total_iters).to(torch.float64)
        return base_lr * (start_factor + slope * done / total_iters)

    return schedule


def polynomial_lr(base_lr: float, total_iters: int = 5, power: float = 1.0) -> Schedule:
    r"""Decays the learning rate polynomially to zero, like ``torch.optim.lr_scheduler.PolynomialLR``.

    .. math::
        \eta_t = \eta_0 \left(1 - \frac{\min(t, T)}{T}\right)^{p}

    with :math:`T` = ``total_iters`` and :math:`p` = ``power``; the rate stays at 0 after :math:`T` steps.

    Args:
        base_lr: :math:`\eta_0`, the learning rate of the first step.
        total_iters: number of steps to decay over (a positive int).
        power: the power of the polynomial (non-negative).

    Example:
        >>> import torch, functrain as ft
        >>> schedule = ft.schedules.polynomial_lr(1.0, total_iters=4, power=2.0)
        >>> [schedule(torch.tensor(t)).item() for t in range(6)]
        [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    """
    base_lr = _non_negative("polynomial_lr", "base_lr", base_lr)
    total_iters = _int("polynomial_lr", "total_iters", total_iters, 1)
    power = _non_negative("polynomial_lr", "power", power)

    def schedule(count: Tensor) -> Tensor:
        done = _as_count(count).clamp(max=total_iters).to(torch.float64)
        return base_lr * (1.0 - done / total_iters) ** power

    return schedule
