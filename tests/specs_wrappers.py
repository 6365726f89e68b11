"""Registry entries for wrappers of any transformation, each around one inner optimiser.

``low_precision_state(adamw, dtype=torch.float64)``: no state tensor is wider than float64, so nothing is
narrowed and the wrapper must be AdamW exactly (its reading, writing, checks and complex refusal, through
the whole battery, sharded too). Its bfloat16 behaviour (stochastic rounding, drift over 2,000 steps) is
tested in tests/test_low_precision.py. ``sam`` is not here: it needs ``value_fn`` (a loss to evaluate
again), which the battery's synthetic gradients do not have; tests/test_sam.py covers it.
"""

from __future__ import annotations

import torch

import functrain as ft

from .registry import Spec, grid


@ft.wrappers.schedulable
def low_precision_state(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *, maximize=False):
    """``ft.low_precision_state(ft.adamw(...), dtype=torch.float64)`` as an optimiser factory, as the battery
    drives one: ft.adamw's signature (it reads the defaults and injects hyperparameters by name), a
    ``ScheduleState`` (``LowPrecisionStateState``, in this module), and messages that name the wrapper."""
    inner = ft.adamw(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    return ft.low_precision_state(inner, dtype=torch.float64)


SPECS = [
    Spec(
        "low_precision_state",
        low_precision_state,
        torch.optim.AdamW,
        grid(amsgrad=[False, True], weight_decay=[0.0, 0.1], maximize=[False, True]),
        base={"lr": 0.01},
        converge={"lr": 0.02, "weight_decay": 0.0},
        bad=[({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.5)}, "betas[1]")],
        wraps=ft.low_precision_state,
    ),
]
