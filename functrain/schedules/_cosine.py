"""Cosine schedules: annealing, warm restarts, warm-up then cosine."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..base import Schedule
from ._common import _INT64_MAX, _as_count, _full, _int, _non_negative, _real

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
