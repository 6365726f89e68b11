"""ft.schedules.warmup_stable_decay against its papers' formula and pytorch-optimizer 4.1.0's get_wsd_schedule.

``schedule(count)`` is the learning rate of optimiser step ``count + 1``: the ``param_groups[0]["lr"]``
of a ``LambdaLR`` stepped once per optimiser step (see ``tests/test_schedules.py``). Every count of
each schedule is compared, warm-up, stable phase, all three decay tails and past the end.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from pytorch_optimizer import get_wsd_schedule

import functrain as ft
from functrain.schedules import warmup_stable_decay

from .harness import make_params, relative_error, run_functrain, run_reference

RTOL, ATOL = 1e-12, 1e-15
PEAK = 0.1
TAILS = {"linear": "linear", "cosine": "cosine", "sqrt": "1-sqrt"}  # ours -> pytorch-optimizer's cooldown_type


def formula(t, peak, warmup, stable, decay, init, end, decay_type):
    """Hu et al. 2024 (MiniCPM) WSD with Hägele et al. 2024's cooldowns, one step at a time, in Python floats."""
    if t < warmup:
        return init + (peak - init) * t / warmup
    if t < warmup + stable:
        return peak
    if t < warmup + stable + decay:
        p = (t - warmup - stable) / decay
        f = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "sqrt": 1 - math.sqrt(p)}[decay_type]
        return end + (peak - end) * f
    return end


def ours(schedule, steps, start=0):
    return [schedule(torch.tensor(start + t, dtype=torch.int64)).item() for t in range(steps)]


def pytorch_optimizer_lrs(steps, peak, **kwargs):
    """The lr of each of ``steps`` optimiser steps under pytorch-optimizer's LambdaLR."""
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=peak)
    scheduler = get_wsd_schedule(opt, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        scheduler.step()
    return lrs


def assert_close(got, want, what):
    assert len(got) == len(want)
    for t, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= RTOL * abs(b) + ATOL, f"{what}, count {t}: ours {a!r}, expected {b!r}"


PHASES = [(10, 50, 40), (0, 30, 17), (7, 0, 25), (5, 20, 0), (1, 1, 1)]  # (warmup, stable, decay)


@pytest.mark.parametrize("decay_type", TAILS)
@pytest.mark.parametrize("phases", PHASES, ids=str)
@pytest.mark.parametrize("init, end", [(0.0, 0.0), (0.01, 0.003)])
def test_equals_the_papers_formula_at_every_count(decay_type, phases, init, end):
    warmup, stable, decay = phases
    steps = warmup + stable + decay + 10
    schedule = warmup_stable_decay(PEAK, warmup, stable, decay, init_value=init, end_value=end, decay_type=decay_type)
    expected = [formula(t, PEAK, warmup, stable, decay, init, end, decay_type) for t in range(steps)]
    assert_close(ours(schedule, steps), expected, f"{decay_type} {phases}")


@pytest.mark.parametrize("decay_type", TAILS)
@pytest.mark.parametrize("phases", PHASES, ids=str)
def test_equals_pytorch_optimizers_get_wsd_schedule_decaying_to_zero(decay_type, phases):
    warmup, stable, decay = phases
    steps = warmup + stable + decay + 10
    theirs = pytorch_optimizer_lrs(
        steps, PEAK, num_warmup_steps=warmup, num_stable_steps=stable, num_decay_steps=decay,
        cooldown_type=TAILS[decay_type],
    )  # fmt: skip
    schedule = warmup_stable_decay(PEAK, warmup, stable, decay, decay_type=decay_type)
    assert_close(ours(schedule, steps), theirs, f"{decay_type} {phases}")


@pytest.mark.parametrize("decay_type", TAILS)
@pytest.mark.parametrize("min_lr_ratio", [0.1, 0.37])
def test_with_a_min_ratio_equals_pytorch_optimizer_where_it_follows_the_paper(decay_type, min_lr_ratio):
    """end_value = min_lr_ratio * peak. pytorch-optimizer's cosine tail decays to that floor, as here:
    equal at every count. Its linear and 1-sqrt tails ignore the floor during the decay (they fall to 0 and
    jump up to it when the decay ends): equal everywhere else, and in the decay equal to the paper's
    ``end + (peak - end) f(p)`` with f read off pytorch-optimizer's own floor-less ratio."""
    warmup, stable, decay = 10, 60, 30
    steps = warmup + stable + decay + 10
    kwargs = dict(num_warmup_steps=warmup, num_stable_steps=stable, num_decay_steps=decay)
    theirs = pytorch_optimizer_lrs(steps, PEAK, min_lr_ratio=min_lr_ratio, cooldown_type=TAILS[decay_type], **kwargs)
    end = min_lr_ratio * PEAK
    got = ours(warmup_stable_decay(PEAK, warmup, stable, decay, end_value=end, decay_type=decay_type), steps)
    if decay_type == "cosine":
        assert_close(got, theirs, "cosine with a floor")
        return
    in_decay = range(warmup + stable, warmup + stable + decay)
    outside = [t for t in range(steps) if t not in in_decay]
    assert_close([got[t] for t in outside], [theirs[t] for t in outside], f"{decay_type} outside the decay")
    shape = pytorch_optimizer_lrs(steps, PEAK, min_lr_ratio=0.0, cooldown_type=TAILS[decay_type], **kwargs)
    expected = [end + (PEAK - end) * shape[t] / PEAK for t in in_decay]
    assert_close([got[t] for t in in_decay], expected, f"{decay_type} decay")
    # The documented difference, as pytorch-optimizer 4.1.0 has it: its last decay step lies below the floor.
    assert theirs[in_decay[-1]] < end <= got[in_decay[-1]]


def test_every_tail_is_continuous_and_reaches_end_value_at_the_end_of_the_decay():
    for decay_type in TAILS:
        schedule = warmup_stable_decay(1.0, 4, 6, 8, end_value=0.25, decay_type=decay_type)
        values = ours(schedule, 25)
        assert values[10] == 1.0 and values[18:] == [0.25] * 7  # decay starts at the peak, ends exactly at end_value
        assert all(a >= b for a, b in zip(values[4:], values[5:])), decay_type  # non-increasing after warm-up


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_returns_0d_float64_on_the_counts_device(device):
    schedule = warmup_stable_decay(PEAK, 3, 4, 5, decay_type="sqrt")
    for count in (0, 5, 9, 2**31 + 3, 2**62):
        value = schedule(torch.tensor(count, dtype=torch.int64, device=device))
        assert (value.dtype, value.shape, value.device.type) == (torch.float64, (), device)


def test_counts_far_past_the_end_hold_end_value():
    schedule = warmup_stable_decay(PEAK, 3, 4, 5, end_value=1e-3, decay_type="cosine")
    assert ours(schedule, 3, start=2**62) == [1e-3] * 3
    assert schedule(7).item() == PEAK  # a Python int count is taken too


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"peak_value": -1.0}, "peak_value"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"stable_steps": -2}, "stable_steps"),
        ({"decay_steps": -1}, "decay_steps"),
        ({"init_value": -0.1}, "init_value"),
        ({"end_value": -0.1}, "end_value"),
        ({"decay_type": "exponential"}, "decay_type"),
        ({"decay_type": "1-sqrt"}, "decay_type"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = {"peak_value": PEAK, "warmup_steps": 2, "stable_steps": 3, "decay_steps": 4, **kwargs}
    with pytest.raises(ValueError, match=re.escape(name)):
        warmup_stable_decay(**args)


def test_non_integer_steps_raise_type_error():
    with pytest.raises(TypeError, match="warmup_steps"):
        warmup_stable_decay(PEAK, 2.5, 3, 4)


@pytest.mark.parametrize("decay_type", TAILS)
def test_drives_adamw_like_torchs_adamw_under_pytorch_optimizers_scheduler(decay_type):
    """ft.adamw(lr=schedule) equals torch.optim.AdamW with pytorch-optimizer's LambdaLR stepped after each step."""
    warmup, stable, decay = 3, 5, 6
    steps = warmup + stable + decay + 2
    params = make_params()
    schedule = warmup_stable_decay(1e-2, warmup, stable, decay, decay_type=decay_type)
    got = run_functrain(ft.adamw(lr=schedule, weight_decay=0.1), params, steps)
    lrs = pytorch_optimizer_lrs(
        steps, 1e-2, num_warmup_steps=warmup, num_stable_steps=stable, num_decay_steps=decay,
        cooldown_type=TAILS[decay_type],
    )  # fmt: skip
    expected = run_reference(torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, params, steps, lr_at=lrs.__getitem__)
    assert relative_error(got, expected) <= 1e-10


@pytest.mark.slow
def test_compiled_equals_eager_and_never_recompiles():
    torch._dynamo.reset()
    schedules = [
        warmup_stable_decay(PEAK, 10, 50, 40, init_value=0.01, end_value=1e-3, decay_type=decay_type)
        for decay_type in TAILS
    ] + [warmup_stable_decay(PEAK, 0, 5, 0)]

    def values(count):
        return torch.stack([schedule(count) for schedule in schedules])

    compiled = torch.compile(values, fullgraph=True)
    compiled(torch.tensor(0))
    with torch.compiler.set_stance("fail_on_recompile"):
        for count in [0, 1, 5, 9, 10, 11, 59, 60, 61, 75, 99, 100, 101, 2**31, 2**62]:
            got, want = compiled(torch.tensor(count)), values(torch.tensor(count))
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-16, msg=lambda m, c=count: f"count {c}: {m}")
