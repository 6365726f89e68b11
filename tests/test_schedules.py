"""ft.schedules against torch.optim.lr_scheduler, value by value.

``schedule(count)`` must equal torch's ``optimizer.param_groups[0]["lr"]`` before optimiser step
``count + 1`` when ``scheduler.step()`` follows every ``optimizer.step()``. Torch's chainable
schedulers recurse from the previous lr while ours use torch's closed forms: they differ by rounding
only (measured: <= ~6e-13 relative over 2000 steps), hence ``RTOL``/``ATOL`` below.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from torch.optim import lr_scheduler as L

import functrain as ft
from functrain import schedules as S

from .harness import make_params, relative_error, run_functrain, run_reference

RTOL, ATOL = 1e-12, 1e-15
BASE = 0.1


def torch_lrs(
    make: Callable[[torch.optim.Optimizer], Any],
    steps: int,
    lr: float = BASE,
    advance: Callable[[Any], None] | None = None,
) -> list[float]:
    """The lr of ``steps`` consecutive optimiser steps; ``advance(scheduler)`` first moves torch to a late count."""
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=lr)
    sched = make(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecated step(epoch) path used to jump ahead
        if advance is not None:
            advance(sched)
        lrs = [float(opt.param_groups[0]["lr"])]
        for _ in range(steps - 1):
            opt.step()  # no gradients: a no-op that keeps torch's step-order bookkeeping happy
            sched.step()
            lrs.append(float(opt.param_groups[0]["lr"]))
    return lrs


def our_lrs(schedule: Callable, steps: int, start: int = 0) -> list[float]:
    return [schedule(torch.tensor(start + t, dtype=torch.int64)).item() for t in range(steps)]


def assert_close(ours: list[float], theirs: list[float], start: int = 0) -> None:
    assert len(ours) == len(theirs)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= RTOL * abs(b) + ATOL, f"count {start + t}: ours {a!r}, torch {b!r}"


# ----------------------------------------------------------------------------- the table


class Case(NamedTuple):
    ours: Callable[[], Callable]
    theirs: Callable[[torch.optim.Optimizer], Any]
    steps: int = 300


def triangle_scale(x):
    return 1.0 / (1.0 + 0.1 * x)  # Python ints for torch, float64 tensors for us: same arithmetic


def decay_scale(x):
    return 0.999**x


CASES = {
    # step_lr
    "step_lr-default": Case(lambda: S.step_lr(BASE, 3), lambda o: L.StepLR(o, 3)),
    "step_lr-gamma": Case(lambda: S.step_lr(BASE, 7, gamma=0.5), lambda o: L.StepLR(o, 7, gamma=0.5)),
    "step_lr-every-step": Case(lambda: S.step_lr(BASE, 1, gamma=0.97), lambda o: L.StepLR(o, 1, gamma=0.97)),
    # multi_step_lr (a Counter in torch: repeats decay twice, order is free, 0 decays at once)
    "multi_step_lr-repeated": Case(
        lambda: S.multi_step_lr(BASE, [3, 8, 8, 20], gamma=0.5), lambda o: L.MultiStepLR(o, [3, 8, 8, 20], gamma=0.5)
    ),
    "multi_step_lr-unsorted": Case(lambda: S.multi_step_lr(BASE, [20, 3, 8]), lambda o: L.MultiStepLR(o, [20, 3, 8])),
    "multi_step_lr-zero": Case(
        lambda: S.multi_step_lr(BASE, [0, 5], gamma=0.3), lambda o: L.MultiStepLR(o, [0, 5], gamma=0.3)
    ),
    "multi_step_lr-empty": Case(lambda: S.multi_step_lr(BASE, []), lambda o: L.MultiStepLR(o, [])),
    # constant_lr
    "constant_lr-default": Case(lambda: S.constant_lr(BASE), lambda o: L.ConstantLR(o)),
    "constant_lr-half": Case(lambda: S.constant_lr(BASE, 0.5, 10), lambda o: L.ConstantLR(o, 0.5, 10)),
    "constant_lr-third": Case(lambda: S.constant_lr(BASE, 0.3, 1), lambda o: L.ConstantLR(o, 0.3, 1)),
    # 0.1 * 0.7 * (1 / 0.7) != 0.1: torch's two multiplications, not base_lr, after total_iters
    "constant_lr-0.7": Case(lambda: S.constant_lr(BASE, 0.7, 6), lambda o: L.ConstantLR(o, 0.7, 6)),
    "constant_lr-one": Case(lambda: S.constant_lr(BASE, 1.0, 4), lambda o: L.ConstantLR(o, 1.0, 4)),
    # linear_lr (past total_iters it stays at end_factor)
    "linear_lr-default": Case(lambda: S.linear_lr(BASE), lambda o: L.LinearLR(o)),
    "linear_lr-warmup": Case(lambda: S.linear_lr(BASE, 0.25, 1.0, 50), lambda o: L.LinearLR(o, 0.25, 1.0, 50)),
    "linear_lr-to-zero": Case(lambda: S.linear_lr(BASE, 1.0, 0.0, 100), lambda o: L.LinearLR(o, 1.0, 0.0, 100)),
    "linear_lr-decay": Case(
        lambda: S.linear_lr(BASE, 0.5, 0.01, 300), lambda o: L.LinearLR(o, 0.5, 0.01, 300), steps=400
    ),
    # exponential_lr
    "exponential_lr-0.99": Case(lambda: S.exponential_lr(BASE, 0.99), lambda o: L.ExponentialLR(o, 0.99)),
    "exponential_lr-0.9": Case(lambda: S.exponential_lr(BASE, 0.9), lambda o: L.ExponentialLR(o, 0.9)),
    "exponential_lr-1": Case(lambda: S.exponential_lr(BASE, 1.0), lambda o: L.ExponentialLR(o, 1.0)),
    # polynomial_lr (0 past total_iters)
    "polynomial_lr-default": Case(lambda: S.polynomial_lr(BASE), lambda o: L.PolynomialLR(o)),
    "polynomial_lr-square": Case(lambda: S.polynomial_lr(BASE, 100, 2.0), lambda o: L.PolynomialLR(o, 100, 2.0)),
    "polynomial_lr-sqrt": Case(
        lambda: S.polynomial_lr(BASE, 300, 0.5), lambda o: L.PolynomialLR(o, 300, 0.5), steps=400
    ),
    "polynomial_lr-power0": Case(lambda: S.polynomial_lr(BASE, 50, 0.0), lambda o: L.PolynomialLR(o, 50, 0.0)),
    # cosine_annealing_lr (periodic past T_max, as torch's recursion)
    "cosine_annealing_lr-10": Case(lambda: S.cosine_annealing_lr(BASE, 10), lambda o: L.CosineAnnealingLR(o, 10)),
    "cosine_annealing_lr-100-eta": Case(
        lambda: S.cosine_annealing_lr(BASE, 100, 1e-3), lambda o: L.CosineAnnealingLR(o, 100, 1e-3), steps=500
    ),
    "cosine_annealing_lr-7-eta": Case(
        lambda: S.cosine_annealing_lr(BASE, 7, 1e-3), lambda o: L.CosineAnnealingLR(o, 7, 1e-3), steps=500
    ),
    "cosine_annealing_lr-1": Case(lambda: S.cosine_annealing_lr(BASE, 1), lambda o: L.CosineAnnealingLR(o, 1)),
    # cosine_annealing_warm_restarts
    "warm_restarts-10": Case(
        lambda: S.cosine_annealing_warm_restarts(BASE, 10), lambda o: L.CosineAnnealingWarmRestarts(o, 10)
    ),
    "warm_restarts-5-eta": Case(
        lambda: S.cosine_annealing_warm_restarts(BASE, 5, 1, 0.01),
        lambda o: L.CosineAnnealingWarmRestarts(o, 5, 1, 0.01),
    ),
    "warm_restarts-mult2": Case(
        lambda: S.cosine_annealing_warm_restarts(BASE, 3, T_mult=2, eta_min=1e-3),
        lambda o: L.CosineAnnealingWarmRestarts(o, 3, T_mult=2, eta_min=1e-3),
        steps=800,
    ),
    "warm_restarts-mult3": Case(
        lambda: S.cosine_annealing_warm_restarts(BASE, 1, T_mult=3),
        lambda o: L.CosineAnnealingWarmRestarts(o, 1, T_mult=3),
        steps=400,
    ),
    # cyclic_lr (momentum cycling off in torch: out of scope here)
    **{
        f"cyclic_lr-{name}": Case(
            lambda kw=kw: S.cyclic_lr(0.01, 0.1, **kw),
            lambda o, kw=kw: L.CyclicLR(o, 0.01, 0.1, cycle_momentum=False, **kw),
        )
        for name, kw in {
            "triangular": dict(step_size_up=10),
            "triangular-asym": dict(step_size_up=4, step_size_down=6),
            "triangular-no-down": dict(step_size_up=5, step_size_down=0),
            "triangular-float-steps": dict(step_size_up=2.5, step_size_down=4.5),
            "triangular2": dict(step_size_up=5, step_size_down=15, mode="triangular2"),
            "exp_range": dict(step_size_up=7, mode="exp_range", gamma=0.99),
            "scale_fn-cycle": dict(step_size_up=6, scale_fn=triangle_scale),
            "scale_fn-iterations": dict(step_size_up=6, scale_fn=decay_scale, scale_mode="iterations"),
            "scale_fn-ignores-mode": dict(step_size_up=3, mode="exp_range", gamma=0.5, scale_fn=triangle_scale),
        }.items()
    },
    "cyclic_lr-falling": Case(
        lambda: S.cyclic_lr(0.1, 0.01, step_size_up=8), lambda o: L.CyclicLR(o, 0.1, 0.01, 8, cycle_momentum=False)
    ),
    # one_cycle_lr: counts 0..total_steps (torch raises past that)
    **{
        f"one_cycle_lr-{name}": Case(
            lambda kw=kw: S.one_cycle_lr(0.1, **kw),
            lambda o, kw=kw: L.OneCycleLR(o, 0.1, cycle_momentum=False, **kw),
            steps=kw.get("total_steps", 70) + 1,
        )
        for name, kw in {
            "default": dict(total_steps=100),
            "three_phase": dict(total_steps=100, three_phase=True),
            "linear": dict(total_steps=100, anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0),
            "linear-three_phase": dict(total_steps=90, anneal_strategy="linear", three_phase=True, pct_start=0.4),
            "epochs": dict(epochs=10, steps_per_epoch=7, pct_start=0.25),
            "pct_start-0": dict(total_steps=50, pct_start=0.0),
            "pct_start-0.5-three_phase": dict(total_steps=20, pct_start=0.5, three_phase=True),
            "pct_start-0.7-three_phase": dict(total_steps=20, pct_start=0.7, three_phase=True),
            "tiny": dict(total_steps=1),
        }.items()
    },
    # sequential_lr: each child restarts its count at its milestone (torch: child._update_lr(0))
    "sequential_lr-constant-exponential": Case(
        lambda: S.sequential_lr([S.constant_lr(BASE, 0.5, 4), S.exponential_lr(BASE, 0.95)], [6]),
        lambda o: L.SequentialLR(o, [L.ConstantLR(o, 0.5, 4), L.ExponentialLR(o, 0.95)], milestones=[6]),
    ),
    "sequential_lr-three": Case(
        lambda: S.sequential_lr(
            [S.linear_lr(BASE, 0.1, 1.0, 10), S.cosine_annealing_lr(BASE, 50, 1e-3), S.step_lr(BASE, 5, 0.5)],
            [10, 60],
        ),
        lambda o: L.SequentialLR(
            o, [L.LinearLR(o, 0.1, 1.0, 10), L.CosineAnnealingLR(o, 50, 1e-3), L.StepLR(o, 5, 0.5)], [10, 60]
        ),
    ),
    "sequential_lr-milestone-0": Case(
        lambda: S.sequential_lr([S.step_lr(BASE, 2), S.exponential_lr(BASE, 0.9)], [0]),
        lambda o: L.SequentialLR(o, [L.StepLR(o, 2), L.ExponentialLR(o, 0.9)], [0]),
    ),
    "sequential_lr-equal-milestones": Case(
        lambda: S.sequential_lr([S.constant_lr(BASE), S.linear_lr(BASE), S.exponential_lr(BASE, 0.9)], [5, 5]),
        lambda o: L.SequentialLR(o, [L.ConstantLR(o), L.LinearLR(o), L.ExponentialLR(o, 0.9)], [5, 5]),
    ),
    "sequential_lr-polynomial-multistep": Case(
        lambda: S.sequential_lr([S.polynomial_lr(BASE, 8, 2.0), S.multi_step_lr(BASE, [0, 3, 3])], [12]),
        lambda o: L.SequentialLR(o, [L.PolynomialLR(o, 8, 2.0), L.MultiStepLR(o, [0, 3, 3])], [12]),
    ),
    # children without a closed form: torch's _update_lr(0) calls get_lr() at the milestone
    "sequential_lr-warm_restarts": Case(
        lambda: S.sequential_lr([S.linear_lr(BASE, 0.2, 1.0, 5), S.cosine_annealing_warm_restarts(BASE, 7, 2)], [5]),
        lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.2, 1.0, 5), L.CosineAnnealingWarmRestarts(o, 7, 2)], [5]),
    ),
    "sequential_lr-cyclic": Case(
        lambda: S.sequential_lr([S.constant_lr(BASE, 0.5, 3), S.cyclic_lr(BASE, 0.5, 4)], [8]),
        lambda o: L.SequentialLR(o, [L.ConstantLR(o, 0.5, 3), L.CyclicLR(o, BASE, 0.5, 4, cycle_momentum=False)], [8]),
    ),
    # torch's OneCycleLR overwrites the optimiser's initial_lr, which torch's first child then
    # starts from: here that child takes max_lr / div_factor as its base_lr.
    "sequential_lr-one_cycle": Case(
        lambda: S.sequential_lr([S.constant_lr(0.5 / 25.0, 0.5, 3), S.one_cycle_lr(0.5, 60)], [5]),
        lambda o: L.SequentialLR(o, [L.ConstantLR(o, 0.5, 3), L.OneCycleLR(o, 0.5, 60, cycle_momentum=False)], [5]),
        steps=66,
    ),
    # warmup_cosine is torch's SequentialLR(LinearLR, CosineAnnealingLR) when init_lr > 0, up to total_steps
    "warmup_cosine-as-sequential": Case(
        lambda: S.warmup_cosine(BASE, 10, 100, init_lr=0.01, end_lr=1e-3),
        lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.01 / BASE, 1.0, 10), L.CosineAnnealingLR(o, 90, 1e-3)], [10]),
        steps=101,
    ),
    "warmup_cosine-as-sequential-short": Case(
        lambda: S.warmup_cosine(BASE, 1, 50, init_lr=0.05),
        lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.05 / BASE, 1.0, 1), L.CosineAnnealingLR(o, 49)], [1]),
        steps=51,
    ),
    # warmup_stable_decay is pytorch-optimizer's get_wsd_schedule (a LambdaLR); tests/test_wsd.py has the rest
    **{
        f"warmup_stable_decay-{ours}": Case(
            lambda ours=ours: S.warmup_stable_decay(
                BASE, 10, 40, 30, end_value=0.1 * BASE * (ours == "cosine"), decay_type=ours
            ),
            lambda o, theirs=theirs: __import__("pytorch_optimizer").get_wsd_schedule(
                o, 10, 40, 30, min_lr_ratio=0.1 * (theirs == "cosine"), cooldown_type=theirs
            ),
            steps=90,
        )
        for ours, theirs in [("linear", "linear"), ("cosine", "cosine"), ("sqrt", "1-sqrt")]
    },
}
PARAMS = [pytest.param(case, id=name) for name, case in CASES.items()]


def test_table_covers_every_schedule():
    covered = {name.split("-")[0].replace("warm_restarts", "cosine_annealing_warm_restarts") for name in CASES}
    assert covered == set(S.__all__)


@pytest.mark.parametrize("case", PARAMS)
def test_equals_torch_value_by_value(case):
    assert_close(our_lrs(case.ours(), case.steps), torch_lrs(case.theirs, case.steps))


# No cos, and pow only of powers of two: the same operations as torch give the same bits.
BITWISE = [name for name in CASES if name.startswith(("constant_lr", "multi_step_lr", "cyclic_lr-triangular"))]
BITWISE += ["step_lr-gamma", "one_cycle_lr-linear", "one_cycle_lr-linear-three_phase", "sequential_lr-cyclic"]


@pytest.mark.parametrize("name", BITWISE)
def test_equals_torch_bit_for_bit_without_transcendentals(name):
    case = CASES[name]
    assert our_lrs(case.ours(), case.steps) == torch_lrs(case.theirs, case.steps)


DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("case", PARAMS)
@pytest.mark.parametrize("device", DEVICES)
def test_returns_0d_float64_on_the_counts_device(case, device):
    schedule = case.ours()
    for count in (0, 7, 2**31 + 3):
        value = schedule(torch.tensor(count, dtype=torch.int64, device=device))
        assert value.dtype == torch.float64
        assert value.shape == ()
        assert value.device.type == torch.device(device).type


# ----------------------------------------------------------------------------- counts past 2**31


def closed_form_at(start):
    """Torch's deprecated ``step(epoch)``: last_epoch = start, lr from ``_get_closed_form_lr``; then it recurses."""
    return lambda sched: sched.step(start)


def recomputed_at(start):
    """For schedulers that compute each lr from last_epoch alone (cyclic, one-cycle)."""

    def advance(sched):
        sched.last_epoch = start - 1
        sched.step()

    return advance


def sequential_at(start, child_index, child_start):
    def advance(sched):
        sched.last_epoch = start
        sched._schedulers[child_index].step(child_start)  # the active child, from its closed form

    return advance


NEAR_1 = 1.0 - 1e-12  # gamma**(2**40) is still ~0.33, not an underflowed 0


def late_cases(s: int) -> dict[str, tuple]:
    """(ours, torch factory, advance) with the interesting part of each schedule near count ``s``."""
    return {
        "step_lr": (S.step_lr(BASE, 2**20, 0.9999), lambda o: L.StepLR(o, 2**20, 0.9999), closed_form_at(s)),
        "multi_step_lr": (
            S.multi_step_lr(BASE, [5, 2**20, s + 10, s + 50, s + 50, s + 1000], 0.5),
            lambda o: L.MultiStepLR(o, [5, 2**20, s + 10, s + 50, s + 50, s + 1000], 0.5),
            closed_form_at(s),
        ),
        "constant_lr": (S.constant_lr(BASE, 0.3, s + 150), lambda o: L.ConstantLR(o, 0.3, s + 150), closed_form_at(s)),
        "linear_lr-ramp": (
            S.linear_lr(BASE, 0.5, 1.0, s + 100),
            lambda o: L.LinearLR(o, 0.5, 1.0, s + 100),
            closed_form_at(s),
        ),
        "linear_lr-after": (S.linear_lr(BASE, 0.5, 0.2, 10), lambda o: L.LinearLR(o, 0.5, 0.2, 10), closed_form_at(s)),
        "exponential_lr": (S.exponential_lr(BASE, NEAR_1), lambda o: L.ExponentialLR(o, NEAR_1), closed_form_at(s)),
        "polynomial_lr-mid": (
            S.polynomial_lr(BASE, 2 * s, 0.5),
            lambda o: L.PolynomialLR(o, 2 * s, 0.5),
            closed_form_at(s),
        ),
        "polynomial_lr-after": (
            S.polynomial_lr(BASE, 10, 2.0),
            lambda o: L.PolynomialLR(o, 10, 2.0),
            closed_form_at(s),
        ),
        # T_max = 10**6 keeps the window clear of the minimum: there torch's recursion restarts from
        # an exact value while pi * count / T_max has lost digits (see the module notes).
        "cosine_annealing_lr": (
            S.cosine_annealing_lr(BASE, 10**6, 1e-3),
            lambda o: L.CosineAnnealingLR(o, 10**6, 1e-3),
            closed_form_at(s),
        ),
        "warm_restarts": (
            S.cosine_annealing_warm_restarts(BASE, 1000, eta_min=1e-3),
            lambda o: L.CosineAnnealingWarmRestarts(o, 1000, eta_min=1e-3),
            closed_form_at(s),
        ),
        # T_0 = 1, T_mult = 2: cycles start at 2**n - 1, so one starts inside each window.
        "warm_restarts-mult2": (
            S.cosine_annealing_warm_restarts(BASE, 1, 2),
            lambda o: L.CosineAnnealingWarmRestarts(o, 1, 2),
            closed_form_at(s),
        ),
        "cyclic_lr-triangular": (
            S.cyclic_lr(0.01, 0.1, 7, 3),
            lambda o: L.CyclicLR(o, 0.01, 0.1, 7, 3, cycle_momentum=False),
            recomputed_at(s),
        ),
        # cycle 3 starts at s + 150 (torch's 2.0 ** (cycle - 1) overflows past ~1024 cycles)
        "cyclic_lr-triangular2": (
            S.cyclic_lr(0.01, 0.1, (s + 150) // 4, mode="triangular2"),
            lambda o: L.CyclicLR(o, 0.01, 0.1, (s + 150) // 4, mode="triangular2", cycle_momentum=False),
            recomputed_at(s),
        ),
        "cyclic_lr-exp_range": (
            S.cyclic_lr(0.01, 0.1, 1000, mode="exp_range", gamma=NEAR_1),
            lambda o: L.CyclicLR(o, 0.01, 0.1, 1000, mode="exp_range", gamma=NEAR_1, cycle_momentum=False),
            recomputed_at(s),
        ),
        "one_cycle_lr": (
            S.one_cycle_lr(0.1, 2**41, three_phase=True),
            lambda o: L.OneCycleLR(o, 0.1, 2**41, three_phase=True, cycle_momentum=False),
            recomputed_at(s),
        ),
        "one_cycle_lr-end": (  # the window ends at count == total_steps
            S.one_cycle_lr(0.1, s + 299, anneal_strategy="linear"),
            lambda o: L.OneCycleLR(o, 0.1, s + 299, anneal_strategy="linear", cycle_momentum=False),
            recomputed_at(s),
        ),
        "sequential_lr": (
            S.sequential_lr([S.constant_lr(BASE, 0.5, 10), S.exponential_lr(BASE, NEAR_1)], [10]),
            lambda o: L.SequentialLR(o, [L.ConstantLR(o, 0.5, 10), L.ExponentialLR(o, NEAR_1)], [10]),
            sequential_at(s, 1, s - 10),
        ),
        "sequential_lr-late-milestone": (
            S.sequential_lr([S.exponential_lr(BASE, NEAR_1), S.cosine_annealing_lr(BASE, 100, 1e-3)], [s + 100]),
            lambda o: L.SequentialLR(o, [L.ExponentialLR(o, NEAR_1), L.CosineAnnealingLR(o, 100, 1e-3)], [s + 100]),
            sequential_at(s, 0, s),
        ),
    }


LATE = [2**31 - 150, 2**40 - 150]


@pytest.mark.parametrize("start", LATE, ids=["2**31", "2**40"])
@pytest.mark.parametrize("name", list(late_cases(LATE[0])))
def test_equals_torch_past_2_31(name, start):
    ours, theirs, advance = late_cases(start)[name]
    assert_close(our_lrs(ours, 300, start), torch_lrs(theirs, 300, advance=advance), start)


def cycle_of(count: int, T_0: int, T_mult: int) -> tuple[int, int]:  # noqa: N803
    """(T_cur, T_i) by walking the cycles in Python ints, as torch's step() does one step at a time."""
    start, length = 0, T_0
    while count >= start + length:
        start, length = start + length, length * T_mult
    return count - start, length


@pytest.mark.parametrize("T_0, T_mult", [(1, 2), (3, 2), (2, 3), (5, 7), (1, 2**31), (7, 2**40)])
def test_warm_restart_cycles_are_exact_at_every_boundary(T_0, T_mult):  # noqa: N803
    """The int64 cycle search against exact integer bookkeeping, at every cycle start +-1 up to 2**63 - 1."""
    schedule = S.cosine_annealing_warm_restarts(1.0, T_0, T_mult)
    counts, start, length = {2**63 - 1}, 0, T_0
    while start < 2**63:
        counts |= {c for c in (start - 1, start, start + 1) if 0 <= c < 2**63}
        start, length = start + length, length * T_mult
    for count in sorted(counts):
        t_cur, t_i = cycle_of(count, T_0, T_mult)
        expected = (1 + math.cos(math.pi * t_cur / t_i)) / 2
        assert schedule(torch.tensor(count)).item() == pytest.approx(expected, rel=1e-12, abs=1e-15), count


# ----------------------------------------------------------------------------- warmup_cosine


def warmup_cosine_reference(t, peak_lr, warmup_steps, total_steps, init_lr, end_lr):
    if t < warmup_steps:
        return init_lr + (peak_lr - init_lr) * t / warmup_steps
    if t > total_steps:
        return end_lr
    progress = (t - warmup_steps) / (total_steps - warmup_steps)
    return end_lr + (peak_lr - end_lr) * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize(
    "peak_lr, warmup_steps, total_steps, init_lr, end_lr, start",
    [
        (0.1, 10, 100, 0.0, 0.0, 0),
        (0.1, 0, 50, 0.0, 1e-3, 0),
        (1.0, 5, 6, 0.5, 0.1, 0),
        (0.3, 25, 200, 0.01, 0.02, 0),
        (0.1, 2**31, 2**32, 0.0, 1e-4, 2**31 - 150),
        (0.1, 10, 2**40, 0.0, 1e-4, 2**40 - 150),
    ],
)
def test_warmup_cosine_equals_its_formula(peak_lr, warmup_steps, total_steps, init_lr, end_lr, start):
    schedule = S.warmup_cosine(peak_lr, warmup_steps, total_steps, init_lr, end_lr)
    steps = min(total_steps + 50, 300)  # runs past the end, where it holds end_lr
    ours = our_lrs(schedule, steps, start)
    expected = [
        warmup_cosine_reference(start + t, peak_lr, warmup_steps, total_steps, init_lr, end_lr) for t in range(steps)
    ]
    assert_close(ours, expected, start)
    if start == 0:  # the landmarks, and monotone halves
        assert ours[0] == init_lr if warmup_steps else ours[0] == peak_lr
        assert ours[warmup_steps] == pytest.approx(peak_lr, rel=1e-15)
        assert ours[total_steps:] == [pytest.approx(end_lr, abs=1e-15)] * (steps - total_steps)
        assert all(a <= b for a, b in zip(ours[:warmup_steps], ours[1 : warmup_steps + 1]))
        assert all(a >= b for a, b in zip(ours[warmup_steps:], ours[warmup_steps + 1 :]))


# ----------------------------------------------------------------------------- edge behaviour


def test_constant_lr_with_factor_zero_restores_base_lr():
    """Torch divides by zero at total_iters; we take its closed form there (base_lr)."""
    param = torch.zeros(1, requires_grad=True)
    sched = L.ConstantLR(torch.optim.SGD([param], lr=BASE), factor=0.0, total_iters=3)
    ours = our_lrs(S.constant_lr(BASE, 0.0, 3), 6)
    assert ours[:3] == torch_lrs(lambda o: L.ConstantLR(o, 0.0, 3), 3)
    for t in range(3, 6):
        sched.last_epoch = t
        assert ours[t] == sched._get_closed_form_lr()[0]


def test_one_cycle_lr_holds_its_last_value_past_total_steps():
    """Torch raises past total_steps; the schedule keeps the value torch gives at total_steps."""
    schedule = S.one_cycle_lr(0.1, 40, anneal_strategy="linear")
    last = torch_lrs(lambda o: L.OneCycleLR(o, 0.1, 40, anneal_strategy="linear", cycle_momentum=False), 41)[-1]
    assert our_lrs(schedule, 5, start=40) == [last] * 5


def test_schedules_accept_python_int_counts():
    schedule = S.step_lr(BASE, 3)
    assert schedule(4).item() == schedule(torch.tensor(4)).item()


# ----------------------------------------------------------------------------- validation


def opt():
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE)


# (our factory call, the argument the message must name, torch's equivalent where torch checks too)
INVALID = {
    "step_lr-step_size": (lambda: S.step_lr(BASE, 0), "step_size", None),
    "step_lr-base_lr": (lambda: S.step_lr(-0.1, 3), "base_lr", None),
    "step_lr-base_lr-nan": (lambda: S.step_lr(float("nan"), 3), "base_lr", None),
    "multi_step_lr-milestones": (lambda: S.multi_step_lr(BASE, [3, -1]), "milestones", None),
    "multi_step_lr-gamma": (lambda: S.multi_step_lr(BASE, [3], gamma=-0.5), "gamma", None),
    "constant_lr-factor-high": (lambda: S.constant_lr(BASE, 1.5), "factor", lambda: L.ConstantLR(opt(), 1.5)),
    "constant_lr-factor-low": (lambda: S.constant_lr(BASE, -0.1), "factor", lambda: L.ConstantLR(opt(), -0.1)),
    "constant_lr-total_iters": (lambda: S.constant_lr(BASE, 0.5, 0), "total_iters", None),
    "linear_lr-start_factor-0": (lambda: S.linear_lr(BASE, 0.0), "start_factor", lambda: L.LinearLR(opt(), 0.0)),
    "linear_lr-start_factor-high": (
        lambda: S.linear_lr(BASE, 1.5),
        "start_factor",
        lambda: L.LinearLR(opt(), 1.5),
    ),
    "linear_lr-end_factor-low": (
        lambda: S.linear_lr(BASE, 0.5, -0.1),
        "end_factor",
        lambda: L.LinearLR(opt(), 0.5, -0.1),
    ),
    "linear_lr-end_factor-high": (
        lambda: S.linear_lr(BASE, 0.5, 1.5),
        "end_factor",
        lambda: L.LinearLR(opt(), 0.5, 1.5),
    ),
    "linear_lr-total_iters": (lambda: S.linear_lr(BASE, total_iters=0), "total_iters", None),
    "exponential_lr-gamma": (lambda: S.exponential_lr(BASE, -0.9), "gamma", None),
    "polynomial_lr-total_iters": (lambda: S.polynomial_lr(BASE, 0), "total_iters", None),
    "polynomial_lr-power": (lambda: S.polynomial_lr(BASE, 5, -1.0), "power", None),
    "cosine_annealing_lr-T_max": (lambda: S.cosine_annealing_lr(BASE, 0), "T_max", None),
    "warm_restarts-T_0": (
        lambda: S.cosine_annealing_warm_restarts(BASE, 0),
        "T_0",
        lambda: L.CosineAnnealingWarmRestarts(opt(), 0),
    ),
    "warm_restarts-T_mult": (
        lambda: S.cosine_annealing_warm_restarts(BASE, 5, 0),
        "T_mult",
        lambda: L.CosineAnnealingWarmRestarts(opt(), 5, 0),
    ),
    "cyclic_lr-mode": (
        lambda: S.cyclic_lr(0.01, 0.1, mode="sawtooth"),
        "mode",
        lambda: L.CyclicLR(opt(), 0.01, 0.1, mode="sawtooth", cycle_momentum=False),
    ),
    "cyclic_lr-scale_mode": (
        lambda: S.cyclic_lr(0.01, 0.1, scale_fn=triangle_scale, scale_mode="epochs"),
        "scale_mode",
        None,
    ),
    "cyclic_lr-step_size_up": (lambda: S.cyclic_lr(0.01, 0.1, 0), "step_size_up", None),
    "cyclic_lr-step_size_down": (lambda: S.cyclic_lr(0.01, 0.1, 5, -1), "step_size_down", None),
    "cyclic_lr-max_lr": (lambda: S.cyclic_lr(0.01, -0.1), "max_lr", None),
    "one_cycle_lr-no-length": (
        lambda: S.one_cycle_lr(0.1),
        "total_steps",
        lambda: L.OneCycleLR(opt(), 0.1),
    ),
    "one_cycle_lr-only-epochs": (
        lambda: S.one_cycle_lr(0.1, epochs=3),
        "total_steps",
        lambda: L.OneCycleLR(opt(), 0.1, epochs=3),
    ),
    "one_cycle_lr-total_steps": (
        lambda: S.one_cycle_lr(0.1, 0),
        "total_steps",
        lambda: L.OneCycleLR(opt(), 0.1, 0),
    ),
    "one_cycle_lr-epochs": (
        lambda: S.one_cycle_lr(0.1, epochs=0, steps_per_epoch=5),
        "epochs",
        lambda: L.OneCycleLR(opt(), 0.1, epochs=0, steps_per_epoch=5),
    ),
    "one_cycle_lr-steps_per_epoch": (
        lambda: S.one_cycle_lr(0.1, epochs=2, steps_per_epoch=-1),
        "steps_per_epoch",
        lambda: L.OneCycleLR(opt(), 0.1, epochs=2, steps_per_epoch=-1),
    ),
    "one_cycle_lr-pct_start-high": (
        lambda: S.one_cycle_lr(0.1, 10, pct_start=1.5),
        "pct_start",
        lambda: L.OneCycleLR(opt(), 0.1, 10, pct_start=1.5),
    ),
    "one_cycle_lr-pct_start-low": (
        lambda: S.one_cycle_lr(0.1, 10, pct_start=-0.1),
        "pct_start",
        lambda: L.OneCycleLR(opt(), 0.1, 10, pct_start=-0.1),
    ),
    "one_cycle_lr-anneal_strategy": (
        lambda: S.one_cycle_lr(0.1, 10, anneal_strategy="exp"),
        "anneal_strategy",
        lambda: L.OneCycleLR(opt(), 0.1, 10, anneal_strategy="exp"),
    ),
    "one_cycle_lr-div_factor": (lambda: S.one_cycle_lr(0.1, 10, div_factor=0.0), "div_factor", None),
    "one_cycle_lr-final_div_factor": (
        lambda: S.one_cycle_lr(0.1, 10, final_div_factor=-1.0),
        "final_div_factor",
        None,
    ),
    "sequential_lr-empty": (
        lambda: S.sequential_lr([], []),
        "schedules",
        lambda: L.SequentialLR(opt(), [], []),
    ),
    "sequential_lr-milestone-count": (
        lambda: S.sequential_lr([S.exponential_lr(BASE, 0.9), S.exponential_lr(BASE, 0.5)], [3, 6]),
        "milestones",
        lambda: (lambda o: L.SequentialLR(o, [L.ExponentialLR(o, 0.9), L.ExponentialLR(o, 0.5)], [3, 6]))(opt()),
    ),
    "sequential_lr-unsorted": (
        lambda: S.sequential_lr([S.exponential_lr(BASE, 0.9)] * 3, [6, 3]),
        "milestones",
        None,
    ),
    "sequential_lr-negative": (
        lambda: S.sequential_lr([S.exponential_lr(BASE, 0.9)] * 2, [-1]),
        "milestones",
        None,
    ),
    "warmup_cosine-total_steps": (lambda: S.warmup_cosine(0.1, 10, 10), "total_steps", None),
    "warmup_cosine-warmup_steps": (lambda: S.warmup_cosine(0.1, -1, 10), "warmup_steps", None),
    "warmup_cosine-peak_lr": (lambda: S.warmup_cosine(-0.1, 1, 10), "peak_lr", None),
    "warmup_cosine-end_lr": (lambda: S.warmup_cosine(0.1, 1, 10, end_lr=-1.0), "end_lr", None),
}


@pytest.mark.parametrize("make, name, theirs", [pytest.param(*v, id=k) for k, v in INVALID.items()])
def test_invalid_arguments_raise_value_error_naming_them(make, name, theirs):
    with pytest.raises(ValueError, match=rf"\b{re.escape(name)}\b"):
        make()
    if theirs is not None:  # torch refuses the same value
        with pytest.raises(ValueError):
            theirs()


def test_one_cycle_lr_refuses_a_zero_length_phase_torch_divides_by_zero_in():
    with pytest.raises(ZeroDivisionError):  # pct_start * total_steps == 1: phase 0 is 0 steps long
        L.OneCycleLR(opt(), 0.1, 4, pct_start=0.25, cycle_momentum=False)
    with pytest.raises(ValueError, match="pct_start"):
        S.one_cycle_lr(0.1, 4, pct_start=0.25)
    with pytest.raises(ValueError, match="pct_start"):  # the last phase is empty: torch fails at step total_steps
        S.one_cycle_lr(0.1, 10, pct_start=1.0)
    S.one_cycle_lr(0.1, 10, pct_start=1.0, three_phase=True)  # no step lands in its empty phase


@pytest.mark.parametrize(
    "make",
    [
        lambda: S.step_lr(BASE, 2.5),
        lambda: S.step_lr("0.1", 3),
        lambda: S.multi_step_lr(BASE, [1.5]),
        lambda: S.multi_step_lr(BASE, 3),
        lambda: S.cosine_annealing_lr(BASE, True),
        lambda: S.cosine_annealing_warm_restarts(BASE, 2.5),
        lambda: S.cosine_annealing_warm_restarts(BASE, 2, eta_min="0"),
        lambda: S.cyclic_lr(0.01, 0.1, scale_fn="cycle"),
        lambda: S.one_cycle_lr(0.1, 10.0),
        lambda: S.sequential_lr([S.step_lr(BASE, 2), 0.5], [3]),
        lambda: S.sequential_lr([S.step_lr(BASE, 2)] * 2, [2.0]),
    ],
)
def test_wrong_types_raise_type_error(make):
    with pytest.raises(TypeError):
        make()


# ----------------------------------------------------------------------------- with the optimisers


@pytest.mark.parametrize(
    "factory, optimiser, torch_optimiser, kwargs, steps",
    [
        (lambda: S.step_lr(0.1, 3), ft.sgd, torch.optim.SGD, {}, 12),
        (lambda: S.one_cycle_lr(0.05, 20, three_phase=True), ft.sgd, torch.optim.SGD, {"momentum": 0.9}, 21),
        (lambda: S.warmup_cosine(1e-2, 5, 30, end_lr=1e-4), ft.adamw, torch.optim.AdamW, {"weight_decay": 0.1}, 35),
        (
            lambda: S.sequential_lr(
                [S.linear_lr(1e-2, 0.1, 1.0, 4), S.cosine_annealing_warm_restarts(1e-2, 3, 2)], [4]
            ),
            ft.adam,
            torch.optim.Adam,
            {},
            25,
        ),
    ],
)
def test_drives_an_optimiser_like_torchs_scheduler(factory, optimiser, torch_optimiser, kwargs, steps):
    """ft.<opt>(lr=schedule) equals torch.optim with the group's lr set before each step from our schedule,
    and that lr sequence equals the torch scheduler's (checked value by value above)."""
    schedule = factory()
    params = make_params()
    ours = run_functrain(optimiser(lr=schedule, **kwargs), params, steps)
    lr_at = lambda t: schedule(torch.tensor(t)).item()  # noqa: E731
    expected = run_reference(torch_optimiser, {"lr": 1.0, **kwargs}, params, steps, lr_at=lr_at)
    assert relative_error(ours, expected) <= 1e-10


def test_sgd_with_step_lr_equals_torch_sgd_with_step_lr():
    """The whole loop on torch's side: torch.optim.SGD driven by torch's StepLR."""
    params = make_params()
    ours = run_functrain(ft.sgd(lr=S.step_lr(0.1, 3, gamma=0.5), momentum=0.9), params, 15)
    lrs = torch_lrs(lambda o: L.StepLR(o, 3, gamma=0.5), 15, lr=0.1)
    expected = run_reference(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, params, 15, lr_at=lrs.__getitem__)
    assert relative_error(ours, expected) <= 1e-12


# ----------------------------------------------------------------------------- compiled


COMPILED_COUNTS = [0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 30, 59, 60, 61, 99, 100, 101, 2**31 - 1, 2**31, 2**31 + 7, 2**40]


@pytest.mark.slow
def test_compiled_schedules_equal_eager_and_never_recompile():
    torch._dynamo.reset()
    schedules = [case.ours() for case in CASES.values()]

    def all_values(count):
        return torch.stack([schedule(count) for schedule in schedules])

    compiled = torch.compile(all_values, fullgraph=True)
    compiled(torch.tensor(0))
    with torch.compiler.set_stance("fail_on_recompile"):
        for count in COMPILED_COUNTS:
            got, want = compiled(torch.tensor(count)), all_values(torch.tensor(count))
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-16, msg=lambda m, c=count: f"count {c}: {m}")


@pytest.mark.slow
def test_compiled_sgd_step_with_scheduled_lr_never_recompiles():
    torch._dynamo.reset()
    schedule = S.sequential_lr([S.linear_lr(0.1, 0.25, 1.0, 3), S.multi_step_lr(0.1, [2, 4, 4], 0.5)], [3])
    tx = ft.sgd(lr=schedule, momentum=0.9)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return ft.apply_updates(params, updates), state

    from .harness import gradient

    compiled = torch.compile(step, fullgraph=True)
    params = eager_params = make_params()
    state = eager_state = tx.init(params)
    params, state = compiled(params, state, gradient(params, 0))
    eager_params, eager_state = step(eager_params, eager_state, gradient(eager_params, 0))
    with torch.compiler.set_stance("fail_on_recompile"):
        for t in range(1, 12):  # the lr changes at 1, 2, 3 (milestone), 5 and 7
            params, state = compiled(params, state, gradient(params, t))
            eager_params, eager_state = step(eager_params, eager_state, gradient(eager_params, t))
    assert relative_error(params, eager_params) <= 1e-12
    expected = run_reference(
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9},
        make_params(),
        12,
        lr_at=torch_lrs(
            lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.25, 1.0, 3), L.MultiStepLR(o, [2, 4, 4], 0.5)], [3]), 12
        ).__getitem__,
    )
    assert relative_error(params, expected) <= 1e-12
