"""Cyclical schedules: cyclic_lr and one_cycle_lr."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .. import _validate
from ..base import Schedule
from ._common import _as_count, _int, _non_negative, _real

# ----------------------------------------------------------------------------- cyclical


def cyclic_lr(
    base_lr: float,
    max_lr: float,
    step_size_up: int = 2000,
    step_size_down: int | None = None,
    mode: str = "triangular",
    gamma: float = 1.0,
    scale_fn: Callable[[Tensor], Tensor] | None = None,
    scale_mode: str = "cycle",
) -> Schedule:
    r"""Cyclical learning rate between ``base_lr`` and ``max_lr``, like ``torch.optim.lr_scheduler.CyclicLR``.

    With :math:`U` = ``step_size_up``, :math:`D` = ``step_size_down`` and :math:`r = U / (U + D)`:

    .. math::
        c &= \lfloor 1 + t / (U + D) \rfloor, \qquad x = 1 + t / (U + D) - c \\
        h &= \begin{cases} x / r & x \le r \\ (x - 1) / (r - 1) & x > r \end{cases} \\
        \eta_t &= \eta_{base} + (\eta_{max} - \eta_{base})\, h \cdot s

    where the scale :math:`s` is 1 (``"triangular"``), :math:`1 / 2^{c - 1}` (``"triangular2"``),
    :math:`\gamma^t` (``"exp_range"``), or ``scale_fn(c)`` / ``scale_fn(t)`` for a custom
    ``scale_fn`` with ``scale_mode`` ``"cycle"`` / ``"iterations"``. As in torch, the built-in modes
    fix their own scale mode and ``mode`` is ignored when ``scale_fn`` is given.

    Momentum cycling (torch's ``cycle_momentum``, ``base_momentum``, ``max_momentum``) is out of
    scope: this schedules the learning rate only. Cycle a momentum by passing a second schedule.
    Past ~1024 cycles torch's ``"triangular2"`` overflows; here its scale goes to 0.

    Args:
        base_lr: the lower learning rate of the cycle (the first step's).
        max_lr: the upper learning rate of the cycle; the amplitude is ``max_lr - base_lr``.
        step_size_up: steps in the increasing half of a cycle (positive).
        step_size_down: steps in the decreasing half (non-negative); ``None`` means ``step_size_up``.
        mode: ``"triangular"``, ``"triangular2"`` or ``"exp_range"``.
        gamma: the base of the ``"exp_range"`` scale.
        scale_fn: a custom scale, called with a 0-d float64 tensor (the cycle number or the step
            count) and returning a number or 0-d tensor; use tensor operations only (no ``math.*``,
            no ``.item()``) so the schedule compiles.
        scale_mode: ``"cycle"`` or ``"iterations"``: what ``scale_fn`` is called with.

    Example:
        >>> import torch, functrain as ft
        >>> schedule = ft.schedules.cyclic_lr(0.0, 1.0, step_size_up=2, mode="triangular2")
        >>> [schedule(torch.tensor(t)).item() for t in range(9)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.25, 0.5, 0.25, 0.0]

    References:
        Smith, 2017, "Cyclical Learning Rates for Training Neural Networks".
    """
    owner = "cyclic_lr"
    base_lr = _non_negative(owner, "base_lr", base_lr)
    max_lr = _non_negative(owner, "max_lr", max_lr)
    up = _real(owner, "step_size_up", step_size_up)
    _validate.in_range(owner, "step_size_up", up, 0.0, low_open=True)
    down = up if step_size_down is None else _real(owner, "step_size_down", step_size_down)
    _validate.in_range(owner, "step_size_down", down, 0.0)
    gamma = _real(owner, "gamma", gamma)
    if scale_fn is None:
        _validate.one_of(owner, "mode", mode, ("triangular", "triangular2", "exp_range"))
        # torch's built-in modes fix the scale mode, whatever scale_mode says.
        scale_mode = "iterations" if mode == "exp_range" else "cycle"
        scale_fn = {
            "triangular": lambda x: 1.0,
            "triangular2": lambda x: 1 / (2.0 ** (x - 1)),
            "exp_range": lambda x: gamma**x,
        }[mode]
    elif not callable(scale_fn):
        raise TypeError(f"{owner}: scale_fn must be callable or None, got {scale_fn!r}")
    else:
        _validate.one_of(owner, "scale_mode", scale_mode, ("cycle", "iterations"))
    total_size = up + down
    step_ratio = up / total_size
    amplitude = max_lr - base_lr

    def schedule(count: Tensor) -> Tensor:
        t = _as_count(count).to(torch.float64)
        position = 1.0 + t / total_size
        cycle = torch.floor(position)
        x = position - cycle
        rising = x / step_ratio
        falling = (x - 1) / (step_ratio - 1) if step_ratio != 1.0 else x  # no falling half when D == 0
        height = amplitude * torch.where(x <= step_ratio, rising, falling)
        scale = scale_fn(cycle if scale_mode == "cycle" else t)
        return (base_lr + height * scale).to(torch.float64)

    return schedule


def one_cycle_lr(
    max_lr: float,
    total_steps: int | None = None,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    r"""The 1cycle policy, like ``torch.optim.lr_scheduler.OneCycleLR``.

    The learning rate anneals from :math:`\eta_{init} = \eta_{max} / \text{div\_factor}` up to
    :math:`\eta_{max}` over the first ``pct_start`` of the ``total_steps``, then down to
    :math:`\eta_{min} = \eta_{init} / \text{final\_div\_factor}` at step ``total_steps - 1``. With
    ``three_phase`` it comes back down to :math:`\eta_{init}` symmetrically first, then to
    :math:`\eta_{min}`. Within a phase from step :math:`a` to :math:`b` (torch's phase ends
    ``pct_start * total_steps - 1``, ``2 * pct_start * total_steps - 2``, ``total_steps - 1``), with
    :math:`p = (t - a) / (b - a)`, the rate moves from :math:`\eta_s` to :math:`\eta_e` as

    .. math::
        \text{cos:}\quad \eta_e + \frac{\eta_s - \eta_e}{2}\left(\cos(\pi p) + 1\right), \qquad
        \text{linear:}\quad (\eta_e - \eta_s)\, p + \eta_s

    Torch refuses to step past ``total_steps``; here the value at ``total_steps`` is held from then
    on. Momentum cycling (torch's ``cycle_momentum``) is out of scope. There is no ``base_lr``: torch
    derives the starting rate from ``max_lr``.

    Args:
        max_lr: the peak learning rate.
        total_steps: the number of steps in the cycle; or give ``epochs`` and ``steps_per_epoch``.
        epochs: with ``steps_per_epoch``, ``total_steps = epochs * steps_per_epoch``.
        steps_per_epoch: see ``epochs``.
        pct_start: the fraction of the cycle spent increasing the learning rate, in [0, 1].
        anneal_strategy: ``"cos"`` or ``"linear"``.
        div_factor: :math:`\eta_{init} = \eta_{max} / \text{div\_factor}` (positive).
        final_div_factor: :math:`\eta_{min} = \eta_{init} / \text{final\_div\_factor}` (positive).
        three_phase: use the three-phase schedule of the paper instead of fastai's two phases.

    Example:
        >>> import torch, functrain as ft
        >>> schedule = ft.schedules.one_cycle_lr(1.0, total_steps=5, pct_start=0.4, anneal_strategy="linear",
        ...                                      div_factor=4.0, final_div_factor=2.5)
        >>> [round(schedule(torch.tensor(t)).item(), 12) for t in range(5)]
        [0.25, 1.0, 0.7, 0.4, 0.1]

    References:
        Smith & Topin, 2017, "Super-Convergence: Very Fast Training of Neural Networks Using Large
        Learning Rates".
    """
    owner = "one_cycle_lr"
    max_lr = _non_negative(owner, "max_lr", max_lr)
    if total_steps is not None:
        total_steps = _int(owner, "total_steps", total_steps, 1)
    elif epochs is not None and steps_per_epoch is not None:
        epochs = _int(owner, "epochs", epochs, 1)
        steps_per_epoch = _int(owner, "steps_per_epoch", steps_per_epoch, 1)
        total_steps = _int(owner, "total_steps (epochs * steps_per_epoch)", epochs * steps_per_epoch, 1)
    else:
        raise ValueError(f"{owner}: total_steps: give total_steps, or both epochs and steps_per_epoch")
    pct_start = _real(owner, "pct_start", pct_start)
    _validate.in_range(owner, "pct_start", pct_start, 0.0, 1.0)
    _validate.one_of(owner, "anneal_strategy", anneal_strategy, ("cos", "linear"))
    div_factor = _real(owner, "div_factor", div_factor)
    _validate.in_range(owner, "div_factor", div_factor, 0.0, low_open=True)
    final_div_factor = _real(owner, "final_div_factor", final_div_factor)
    _validate.in_range(owner, "final_div_factor", final_div_factor, 0.0, low_open=True)

    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    # (end_step, start_lr, end_lr), exactly torch's _schedule_phases.
    if three_phase:
        phases = [
            (float(pct_start * total_steps) - 1, initial_lr, max_lr),
            (float(2 * pct_start * total_steps) - 2, max_lr, initial_lr),
            (total_steps - 1, initial_lr, min_lr),
        ]
    else:
        phases = [
            (float(pct_start * total_steps) - 1, initial_lr, max_lr),
            (total_steps - 1, max_lr, min_lr),
        ]
    # Torch picks the first phase whose end_step >= step (the last one otherwise); a picked phase
    # of zero length divides by zero there.
    start_step, latest_end = 0.0, None
    for i, (end_step, _, _) in enumerate(phases):
        # The steps that pick phase i: past every earlier end, and up to its own (any, for the last).
        first_step = 0 if latest_end is None else max(0, math.floor(latest_end) + 1)
        final_step = total_steps if i == len(phases) - 1 else min(total_steps, math.floor(end_step))
        if end_step == start_step and first_step <= final_step:
            raise ValueError(
                f"{owner}: pct_start={pct_start} with total_steps={total_steps} gives phase {i} zero steps "
                "(torch divides by zero there); change pct_start or total_steps"
            )
        latest_end = end_step if latest_end is None else max(latest_end, end_step)
        start_step = end_step

    def anneal(start: float, end: float, pct: Tensor) -> Tensor:
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def schedule(count: Tensor) -> Tensor:
        step = _as_count(count).clamp(max=total_steps).to(torch.float64)
        values, ends, start_step = [], [], 0.0
        for end_step, start_lr, end_lr in phases:
            # (end_step - start_step) may be 0 only for a phase no step picks (checked above).
            values.append(anneal(start_lr, end_lr, (step - start_step) / ((end_step - start_step) or 1.0)))
            ends.append(end_step)
            start_step = end_step
        lr = values[-1]
        for value, end_step in zip(reversed(values[:-1]), reversed(ends[:-1])):
            lr = torch.where(step <= end_step, value, lr)
        return lr

    return schedule
