"""Learning-rate schedules: the optimiser step count in, a learning rate out.

A schedule is a :data:`~functrain.base.Schedule`, ``Callable[[Tensor], Tensor]``: it maps the 0-d
int64 ``count`` of optimiser updates done so far (0 before the first update) to a 0-d float64 tensor
on the count's device. Pass it wherever a hyperparameter is accepted (``ft.sgd(lr=schedule)``).

Each ``<name>`` here equals ``torch.optim.lr_scheduler.<Name>`` value by value when the torch
scheduler is stepped once per optimiser step: ``schedule(count)`` is the ``param_groups[0]["lr"]``
that torch's ``optimizer.step()`` number ``count + 1`` uses, so ``schedule(0)`` is the learning rate
right after the scheduler is constructed. Arguments keep torch's names and defaults; where torch
reads the starting learning rate from the optimiser, it is the first argument, ``base_lr``.

How the values are computed:

- Pure tensor maths on the count, no ``.item()`` and no Python branch on its value, so a compiled
  step whose learning rate follows a schedule never recompiles as the count moves. The schedule's
  constants are Python numbers, so nothing is copied to the device per call.
- int64 for counts and float64 for values throughout: counts past ``2**31`` (and up to ``2**53``,
  where float64 stops holding every integer) are exact.
- Torch computes many schedulers *recursively* ("chainable": the new lr is the previous one times
  a factor). Here each value is computed in closed form, with torch's ``_get_closed_form_lr``
  arithmetic, operation for operation. The two differ only by rounding: over 2000 steps from the
  start the recursion drifts from the closed form by at most ~1e-14 relative for ``linear_lr``,
  ``polynomial_lr``, ``exponential_lr`` and ``step_lr``, and by up to ~6e-13 relative for
  ``cosine_annealing_lr`` (its recursion restarts from an exact value at each minimum, while
  ``pi * count / T_max`` loses digits as the count grows). The tests hold every schedule to
  ``|ours - torch| <= 1e-12 * |torch| + 1e-15``. One measured exception, torch's and not ours:
  ``LinearLR`` decaying to 0 over ~2**31 steps, where the recursion's factor suffers cancellation
  near the end (2e-8 relative, 8e-18 absolute at ``base_lr=0.1``).
- Schedulers that are not chainable (``cosine_annealing_warm_restarts``, ``cyclic_lr``,
  ``one_cycle_lr``), and ``constant_lr``/``multi_step_lr``, repeat torch's arithmetic operation for
  operation: they equal torch bit for bit, except that ``torch.cos``/``torch.pow`` and Python's
  ``math`` may round the last bit differently.

Checks beyond torch's (each a value torch would divide by zero on, crash on later, or silently
misuse): step counts (``step_size``, ``total_iters``, ``T_max``...) are positive ints; learning
rates and ``gamma`` are non-negative; ``polynomial_lr``'s ``power`` is non-negative; a
``one_cycle_lr`` phase of zero length that a step would land in is refused; ``cyclic_lr``'s
``scale_mode`` is one of its two values; ``sequential_lr``'s milestones are sorted.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from . import _validate
from .base import Schedule

__all__ = [
    "constant_lr",
    "cosine_annealing_lr",
    "cosine_annealing_warm_restarts",
    "cyclic_lr",
    "exponential_lr",
    "linear_lr",
    "multi_step_lr",
    "one_cycle_lr",
    "polynomial_lr",
    "sequential_lr",
    "step_lr",
    "warmup_cosine",
]

_INT64_MAX = 2**63 - 1


# ----------------------------------------------------------------------------- helpers


def _real(owner: str, name: str, value) -> float:
    """The value as a Python float; TypeError for anything but a real number, ValueError for NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}: {value!r}")
    if math.isnan(value):
        raise ValueError(f"{owner}: {name} must not be NaN")
    return float(value)


def _non_negative(owner: str, name: str, value) -> float:
    value = _real(owner, name, value)
    _validate.in_range(owner, name, value, 0.0)
    return value


def _int(owner: str, name: str, value, low: int) -> int:
    """The value as a Python int >= ``low`` (and within int64); TypeError for a non-integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}: {value!r}")
    if not low <= value <= _INT64_MAX:
        raise ValueError(f"{owner}: {name} must be an int in [{low}, 2**63 - 1], got {value!r}")
    return int(value)


def _as_count(count) -> Tensor:
    """The step count as an int64 tensor (a Python int is accepted, on the CPU)."""
    return torch.as_tensor(count).to(torch.int64)


def _full(value: float, like: Tensor) -> Tensor:
    """A float64 tensor of ``value`` on ``like``'s device, for ``torch.where`` branches that are constants."""
    return torch.full((), value, dtype=torch.float64, device=like.device)


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


# ----------------------------------------------------------------------------- cosine


def cosine_annealing_lr(base_lr: float, T_max: int, eta_min: float = 0.0) -> Schedule:  # noqa: N803 - torch's name
    r"""Cosine annealing from ``base_lr`` to ``eta_min`` over ``T_max`` steps, like
    ``torch.optim.lr_scheduler.CosineAnnealingLR``.

    .. math::
        \eta_t = \eta_{\min} + \frac{(\eta_0 - \eta_{\min})\left(1 + \cos\left(\pi t / T_{\max}\right)\right)}{2}

    Past ``T_max`` the cosine continues (back up to ``base_lr`` at :math:`2 T_{\max}`, and so on), as
    torch's recursive form does. At counts where :math:`\pi t / T_{\max}` is large (past ~2**31 for
    small ``T_max``) float64 loses digits of that angle; this follows torch's closed form there,
    which torch's recursion then agrees with to ~1e-9 relative only (see the module notes).

    Args:
        base_lr: :math:`\eta_0`, the learning rate of the first step.
        T_max: number of steps from ``base_lr`` down to ``eta_min`` (a positive int).
        eta_min: the minimum learning rate.

    Example:
        >>> import torch, functrain as ft
        >>> schedule = ft.schedules.cosine_annealing_lr(1.0, T_max=2)
        >>> [round(schedule(torch.tensor(t)).item(), 12) for t in range(5)]
        [1.0, 0.5, 0.0, 0.5, 1.0]

    References:
        Loshchilov & Hutter, 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts".
    """
    base_lr = _non_negative("cosine_annealing_lr", "base_lr", base_lr)
    T_max = _int("cosine_annealing_lr", "T_max", T_max, 1)  # noqa: N806
    eta_min = _real("cosine_annealing_lr", "eta_min", eta_min)
    amplitude = base_lr - eta_min

    def schedule(count: Tensor) -> Tensor:
        t = _as_count(count).to(torch.float64)
        return eta_min + amplitude * (1 + torch.cos(math.pi * t / T_max)) / 2

    return schedule


def cosine_annealing_warm_restarts(
    base_lr: float,
    T_0: int,  # noqa: N803 - torch's names
    T_mult: int = 1,  # noqa: N803
    eta_min: float = 0.0,
) -> Schedule:
    r"""Cosine annealing restarted every :math:`T_i` steps, like
    ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`` stepped once per optimiser step.

    .. math::
        \eta_t = \eta_{\min} + \frac{(\eta_0 - \eta_{\min})\left(1 + \cos\left(\pi T_{cur} / T_i\right)\right)}{2}

    where cycle :math:`i = 0, 1, \dots` lasts :math:`T_i = T_0 \cdot T_{mult}^i` steps and
    :math:`T_{cur}` counts the steps since its start: cycle :math:`i` starts at step
    :math:`T_0 (T_{mult}^i - 1) / (T_{mult} - 1)` (at :math:`i \, T_0` when :math:`T_{mult} = 1`).
    The cycle is found in exact int64 arithmetic.

    Args:
        base_lr: :math:`\eta_0`, the learning rate at the start of every cycle.
        T_0: length of the first cycle (a positive int).
        T_mult: factor by which each cycle is longer than the last (an int >= 1).
        eta_min: the minimum learning rate.

    Example:
        >>> import torch, functrain as ft
        >>> schedule = ft.schedules.cosine_annealing_warm_restarts(1.0, T_0=2, T_mult=2)
        >>> [round(schedule(torch.tensor(t)).item(), 12) for t in range(7)]
        [1.0, 0.5, 1.0, 0.853553390593, 0.5, 0.146446609407, 1.0]

    References:
        Loshchilov & Hutter, 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts".
    """
    owner = "cosine_annealing_warm_restarts"
    base_lr = _non_negative(owner, "base_lr", base_lr)
    T_0 = _int(owner, "T_0", T_0, 1)  # noqa: N806
    T_mult = _int(owner, "T_mult", T_mult, 1)  # noqa: N806
    eta_min = _real(owner, "eta_min", eta_min)
    amplitude = base_lr - eta_min

    # The largest cycle index whose T_mult**i fits in int64 (62 for T_mult=2). Cycle n_max + 2 would
    # start past 2**63, so no int64 count lies beyond cycle n_max + 1.
    n_max = 0
    while T_mult > 1 and T_mult ** (n_max + 1) <= _INT64_MAX:
        n_max += 1

    def position(count: Tensor) -> tuple[Tensor, Tensor]:
        """(T_cur, T_i): steps since the current cycle started (int64), and its length (float64)."""
        if T_mult == 1:
            return count % T_0, _full(float(T_0), count)
        # Cycle i starts at T_0 * g(i), g(i) = (T_mult**i - 1) / (T_mult - 1) = 1 + T_mult + ... (an int).
        # With q = count // T_0, the cycle is the largest i with g(i) <= q. A float64 log gives it to
        # within one; two integer corrections make it exact. Nothing overflows: the estimate is
        # clamped to n_max so T_mult**i stays in int64, the upward test divides q instead of
        # multiplying g, g is only kept once g <= q (so T_0 * g <= count), and the cycle length is
        # a float64 power.
        q = torch.div(count, T_0, rounding_mode="floor")
        i = torch.floor(torch.log1p(q.to(torch.float64) * (T_mult - 1)) / math.log(T_mult))
        i = i.to(torch.int64).clamp(0, n_max)
        g = (torch.pow(T_mult, i) - 1) // (T_mult - 1)
        too_far = q < g  # the estimate overshot: step back one cycle, g(i - 1) = (g(i) - 1) / T_mult
        i = torch.where(too_far, i - 1, i)
        g = torch.where(too_far, (g - 1) // T_mult, g)
        not_far_enough = torch.div(q - 1, T_mult, rounding_mode="floor") >= g  # q >= g(i + 1) = T_mult * g + 1
        i = torch.where(not_far_enough, i + 1, i)
        g = torch.where(not_far_enough, T_mult * g + 1, g)
        return count - T_0 * g, T_0 * float(T_mult) ** i.to(torch.float64)

    def schedule(count: Tensor) -> Tensor:
        t_cur, t_i = position(_as_count(count))
        return eta_min + amplitude * (1 + torch.cos(math.pi * t_cur.to(torch.float64) / t_i)) / 2

    return schedule


def warmup_cosine(
    peak_lr: float, warmup_steps: int, total_steps: int, init_lr: float = 0.0, end_lr: float = 0.0
) -> Schedule:
    r"""Linear warm-up from ``init_lr`` to ``peak_lr``, then cosine decay to ``end_lr``.

    With :math:`W` = ``warmup_steps`` and :math:`T` = ``total_steps``:

    .. math::
        \eta_t = \begin{cases}
            \eta_{init} + (\eta_{peak} - \eta_{init})\, t / W & t < W \\
            \eta_{end} + \frac{(\eta_{peak} - \eta_{end})\left(1 + \cos\left(\pi (t - W) / (T - W)\right)\right)}{2}
                & W \le t \le T \\
            \eta_{end} & t > T
        \end{cases}

    so the peak is reached at step :math:`W` and ``end_lr`` at step :math:`T` (held afterwards). For
    ``init_lr > 0`` and :math:`t \le T` this is torch's
    ``SequentialLR([LinearLR(start_factor=init_lr / peak_lr, total_iters=W), CosineAnnealingLR(T_max=T - W,
    eta_min=end_lr)], milestones=[W])`` on an optimiser with ``lr=peak_lr`` (equal up to rounding);
    torch's cosine would then climb again past :math:`T`, where this one stays at ``end_lr``.

    Args:
        peak_lr: :math:`\eta_{peak}`, the learning rate at the end of the warm-up.
        warmup_steps: :math:`W`, the number of warm-up steps (an int >= 0; 0 starts at the peak).
        total_steps: :math:`T`, the step at which ``end_lr`` is reached (an int > ``warmup_steps``).
        init_lr: :math:`\eta_{init}`, the learning rate of the first step.
        end_lr: :math:`\eta_{end}`, the final learning rate.

    Example:
        >>> import torch, functrain as ft
        >>> schedule = ft.schedules.warmup_cosine(1.0, warmup_steps=2, total_steps=4)
        >>> [round(schedule(torch.tensor(t)).item(), 12) for t in range(6)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    owner = "warmup_cosine"
    peak_lr = _non_negative(owner, "peak_lr", peak_lr)
    warmup_steps = _int(owner, "warmup_steps", warmup_steps, 0)
    total_steps = _int(owner, "total_steps", total_steps, warmup_steps + 1)
    init_lr = _non_negative(owner, "init_lr", init_lr)
    end_lr = _non_negative(owner, "end_lr", end_lr)
    decay_steps = total_steps - warmup_steps

    def schedule(count: Tensor) -> Tensor:
        t = _as_count(count).clamp(max=total_steps).to(torch.float64)
        # max(W, 1): with no warm-up the (unused) warm-up branch must not divide by zero.
        warm = init_lr + (peak_lr - init_lr) * t / max(warmup_steps, 1)
        decay = end_lr + (peak_lr - end_lr) * (1 + torch.cos(math.pi * (t - warmup_steps) / decay_steps)) / 2
        return torch.where(t < warmup_steps, warm, decay)

    return schedule


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


# ----------------------------------------------------------------------------- composition


def sequential_lr(schedules: Sequence[Schedule], milestones: Sequence[int]) -> Schedule:
    r"""Runs ``schedules`` one after another, like ``torch.optim.lr_scheduler.SequentialLR``.

    .. math::
        \eta_t = \text{schedules}[k](t - m_{k-1}), \quad
        k = \#\{j : m_j \le t\}, \quad m_{-1} = 0

    Schedule :math:`k` starts from its own count 0 at milestone :math:`m_{k-1}`, as torch restarts a
    child at its milestone (``_update_lr(0)``, i.e. the child's closed form at epoch 0, then chained
    steps from there). Torch's children all read the optimiser's learning rate, and a child such as
    ``OneCycleLR`` overwrites the shared ``initial_lr`` the others start from; here each child
    carries its own ``base_lr``, which gives torch's values when each is the rate the torch child
    starts from. A milestone of 0 skips the first schedule; equal milestones skip the ones between.

    Args:
        schedules: the schedules to run in turn (at least one).
        milestones: ``len(schedules) - 1`` sorted non-negative ints: the step counts at which the
            next schedule takes over.

    Example:
        >>> import torch, functrain as ft
        >>> warmup = ft.schedules.linear_lr(1.0, start_factor=0.5, total_iters=2)
        >>> decay = ft.schedules.exponential_lr(1.0, gamma=0.5)
        >>> schedule = ft.schedules.sequential_lr([warmup, decay], milestones=[2])
        >>> [schedule(torch.tensor(t)).item() for t in range(5)]
        [0.5, 0.75, 1.0, 0.5, 0.25]
    """
    owner = "sequential_lr"
    schedules = list(schedules)
    milestones = list(milestones)
    if not schedules:
        raise ValueError(f"{owner}: schedules must hold at least one schedule, got none")
    for i, child in enumerate(schedules):
        if not callable(child):
            raise TypeError(f"{owner}: schedules[{i}] must be a schedule (a callable), got {child!r}")
    if len(milestones) != len(schedules) - 1:
        raise ValueError(
            f"{owner}: milestones must hold len(schedules) - 1 = {len(schedules) - 1} step counts, "
            f"got {len(milestones)}"
        )
    milestones = [_int(owner, "milestones", m, 0) for m in milestones]
    if milestones != sorted(milestones):
        raise ValueError(f"{owner}: milestones must be sorted, got {milestones}")

    def schedule(count: Tensor) -> Tensor:
        count = _as_count(count)
        lr = schedules[0](count)
        for milestone, child in zip(milestones, schedules[1:]):
            # clamp: a child is never asked for a negative count (its value there is discarded).
            lr = torch.where(count >= milestone, child((count - milestone).clamp(min=0)), lr)
        return lr.to(torch.float64)

    return schedule
