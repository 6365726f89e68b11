"""Schedules in sequence, each restarting its count at its milestone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import Schedule
from ._common import _as_count, _int

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
