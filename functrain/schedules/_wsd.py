"""Warmup-stable-decay: warm up, hold the peak for as long as training runs, then cool down."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _validate
from ..base import Schedule
from ._common import _as_count, _int, _non_negative

DECAY_TYPES = ("linear", "cosine", "sqrt")


def warmup_stable_decay(
    peak_value: float,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    init_value: float = 0.0,
    end_value: float = 0.0,
    decay_type: str = "linear",
) -> Schedule:
    r"""Warmup-stable-decay (WSD, "trapezoidal"): a linear warm-up to ``peak_value``, a constant stretch at
    the peak, and a short decay ("cooldown") to ``end_value``.

    With :math:`W, S, D` = ``warmup_steps``, ``stable_steps``, ``decay_steps`` and the decay's progress
    :math:`p = (t - W - S) / D`:

    .. math::
        \eta_t = \begin{cases}
            \eta_{init} + (\eta_{peak} - \eta_{init})\, t / W & t < W \\
            \eta_{peak} & W \le t < W + S \\
            \eta_{end} + (\eta_{peak} - \eta_{end})\, f(p) & W + S \le t < W + S + D \\
            \eta_{end} & t \ge W + S + D
        \end{cases}

    with the decay's shape :math:`f(p) = 1 - p` (``"linear"``), :math:`(1 + \cos \pi p) / 2`
    (``"cosine"``) or :math:`1 - \sqrt{p}` (``"sqrt"``, the "1-sqrt" cooldown Hägele et al. found best).
    So :math:`f` falls from 1 at the end of the stable phase to 0 at step :math:`W + S + D`, where
    ``end_value`` is reached and then held; the schedule is continuous there.

    The point of WSD is that the stable phase needs no total length fixed in advance: a run can be
    continued from any checkpoint of the stable phase, and a cooldown of ~10-20% of the steps taken
    from any of them matches a cosine schedule tuned for that length (Hägele et al., 2024).

    Equal, value by value, to pytorch-optimizer 4.1.0's ``get_wsd_schedule`` (a ``LambdaLR``, stepped
    once per optimiser step, on an optimiser with ``lr=peak_value``) with ``cooldown_type`` ``"linear"``,
    ``"cosine"``, ``"1-sqrt"`` (``num_cycles=0.5``), ``init_value=0`` and
    ``min_lr_ratio = end_value / peak_value``, with one difference, where this follows the papers:
    pytorch-optimizer applies ``min_lr_ratio`` only to its cosine tail; its linear and 1-sqrt tails fall to 0
    and jump up to ``min_lr_ratio`` once the decay ends. Here every tail decays to ``end_value``. With
    ``end_value=0`` the two agree for every decay type.

    Args:
        peak_value: :math:`\eta_{peak}`, the value of the stable phase (>= 0).
        warmup_steps: :math:`W`, steps of linear warm-up (an int >= 0; 0 starts at the peak).
        stable_steps: :math:`S`, steps at the peak (an int >= 0).
        decay_steps: :math:`D`, steps of the decay (an int >= 0; 0 drops to ``end_value`` after the stable phase).
        init_value: :math:`\eta_{init}`, the value at step 0 (>= 0).
        end_value: :math:`\eta_{end}`, the value the decay ends at, held after it (>= 0).
        decay_type: the decay's shape: ``"linear"``, ``"cosine"`` or ``"sqrt"`` (1 - sqrt).

    Example:
        >>> import torch, functrain as ft
        >>> schedule = ft.schedules.warmup_stable_decay(1.0, warmup_steps=2, stable_steps=2, decay_steps=4)
        >>> [round(schedule(torch.tensor(t)).item(), 12) for t in range(10)]
        [0.0, 0.5, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
        >>> tx = ft.adamw(lr=ft.schedules.warmup_stable_decay(1e-3, 100, 8000, 2000, decay_type="sqrt"))

    References:
        Hu et al., 2024, "MiniCPM: Unveiling the Potential of Small Language Models with Scalable Training
        Strategies" (section 4, the WSD scheduler). Hägele et al., 2024, "Scaling Laws and Compute-Optimal
        Training Beyond Fixed Training Durations" (the linear and 1-sqrt cooldowns). pytorch-optimizer 4.1.0
        ``get_wsd_schedule``.
    """
    owner = "warmup_stable_decay"
    peak_value = _non_negative(owner, "peak_value", peak_value)
    warmup_steps = _int(owner, "warmup_steps", warmup_steps, 0)
    stable_steps = _int(owner, "stable_steps", stable_steps, 0)
    decay_steps = _int(owner, "decay_steps", decay_steps, 0)
    init_value = _non_negative(owner, "init_value", init_value)
    end_value = _non_negative(owner, "end_value", end_value)
    _validate.one_of(owner, "decay_type", decay_type, DECAY_TYPES)
    decay_start = warmup_steps + stable_steps
    decay_end = decay_start + decay_steps

    def shape(p: Tensor) -> Tensor:
        """f(p): 1 at the start of the decay, 0 at its end."""
        if decay_type == "linear":
            return 1 - p
        if decay_type == "cosine":
            return (1 + torch.cos(math.pi * p)) / 2
        return 1 - torch.sqrt(p)

    def schedule(count: Tensor) -> Tensor:
        t = _as_count(count).clamp(max=decay_end).to(torch.float64)  # clamped: int64 counts past 2**53 stay exact
        # max(., 1): a phase of zero length is never selected, but its (unused) branch must not divide by zero.
        warm = init_value + (peak_value - init_value) * t / max(warmup_steps, 1)
        progress = ((t - decay_start) / max(decay_steps, 1)).clamp(0.0, 1.0)
        decay = end_value + (peak_value - end_value) * shape(progress)
        tail = torch.where(t < decay_end, decay, end_value)
        return torch.where(t < warmup_steps, warm, torch.where(t < decay_start, peak_value, tail))

    return schedule
