"""Checks of the optimisers beyond torch.optim that the common parity battery does not make:
hand-computed first steps (which also check the imperative references), the trust ratio's zero-norm
cases, and schedule-free's eval point against the ``schedulefree`` package."""

from __future__ import annotations

import math

import pytest
import torch

import functrain as ft

from . import harness, references

schedulefree = pytest.importorskip("schedulefree")


def _first_step(tx, params, grads):
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    return ft.apply_updates(params, updates)


def _reference_first_step(reference, params, grads, **kwargs):
    tensors = {k: v.clone() for k, v in params.items()}
    opt = reference(list(tensors.values()), **kwargs)
    for k, v in tensors.items():
        v.grad = grads[k].clone()
    opt.step()
    return tensors


def _f64(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_lion_first_step_by_hand():
    # m_0 = 0, so c = (1 - b1) g and the step is lr * (sign(g) + wd * theta).
    params, grads = {"w": _f64(1.0, -2.0, 0.5)}, {"w": _f64(0.5, -3.0, 0.0)}
    expected = _f64(1.0 - 0.1 * (1 + 0.5), -2.0 - 0.1 * (-1 - 1.0), 0.5 - 0.1 * (0 + 0.25))
    kwargs = dict(lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    torch.testing.assert_close(_first_step(ft.lion(**kwargs), params, grads)["w"], expected)
    torch.testing.assert_close(_reference_first_step(references.Lion, params, grads, **kwargs)["w"], expected)


def test_lion_momentum_lags_the_update():
    # Step 2 uses m_1 = (1 - b2) g_1 interpolated with g_2: c = b1 (1 - b2) g_1 + (1 - b1) g_2.
    params = {"w": _f64(0.0, 0.0)}
    g1, g2 = _f64(1.0, 1.0), _f64(-0.05, -0.2)
    tx = ft.lion(lr=1.0, betas=(0.9, 0.5))
    state = tx.init(params)
    _, state = tx.update({"w": g1}, state, params)
    updates, _ = tx.update({"w": g2}, state, params)
    # c = 0.9 * 0.5 * 1 + 0.1 * g2 = (0.445, 0.425): both positive, so both entries step by -1.
    torch.testing.assert_close(updates["w"], _f64(-1.0, -1.0))


def test_lamb_first_step_by_hand():
    # Adam's first bias-corrected direction is g / (|g| + eps) ~ sign(g); the trust ratio rescales
    # it to ||theta|| / ||u||.
    params, grads = {"w": _f64(3.0, -4.0)}, {"w": _f64(0.5, -3.0)}
    eps = 1e-6
    u = _f64(0.5 / (0.5 + eps), -3.0 / (3.0 + eps))
    expected = params["w"] - 0.1 * (5.0 / u.norm()) * u
    torch.testing.assert_close(_first_step(ft.lamb(lr=0.1, eps=eps), params, grads)["w"], expected)
    torch.testing.assert_close(_reference_first_step(references.Lamb, params, grads, lr=0.1, eps=eps)["w"], expected)


def test_lars_first_step_by_hand():
    # local lr = 0.1 * ||(3, -4)|| / ||g + wd theta||; the first momentum buffer is the step itself.
    params, grads = {"w": _f64(3.0, -4.0)}, {"w": _f64(0.3, -0.4)}
    kwargs = dict(lr=2.0, weight_decay=0.1, momentum=0.9, trust_coefficient=0.1)
    d = _f64(0.6, -0.8)  # g + 0.1 * theta, norm 1
    expected = params["w"] - 2.0 * 0.1 * 5.0 * d
    torch.testing.assert_close(_first_step(ft.lars(**kwargs), params, grads)["w"], expected)
    torch.testing.assert_close(_reference_first_step(references.Lars, params, grads, **kwargs)["w"], expected)
    nesterov = _first_step(ft.lars(**kwargs, nesterov=True), params, grads)["w"]
    torch.testing.assert_close(nesterov, params["w"] - 1.9 * 2.0 * 0.1 * 5.0 * d)


def test_trust_ratio_is_one_when_a_norm_is_zero():
    tx = ft.transforms.scale_by_trust_ratio(trust_coefficient=0.01, eps=1e-3)
    params = {"zero": torch.zeros(3), "w": torch.tensor([3.0, 4.0]), "still": torch.tensor([1.0])}
    updates = {"zero": torch.tensor([1.0, -2.0, 2.0]), "w": torch.tensor([0.0, 2.0]), "still": torch.zeros(1)}
    out, _ = tx.update(updates, tx.init(params), params)
    torch.testing.assert_close(out["zero"], updates["zero"])  # ||theta|| = 0: unchanged
    torch.testing.assert_close(out["w"], torch.tensor([0.0, 2.0]) * 0.01 * 5.0 / (2.0 + 1e-3))
    torch.testing.assert_close(out["still"], torch.zeros(1))  # ||u|| = 0: stays 0, no nan


def test_lars_zero_bias_matches_reference():
    # A zero-initialised tensor takes the plain step (ratio 1) until it moves, in both.
    params = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    kwargs = dict(lr=0.1, weight_decay=1e-2, momentum=0.9, trust_coefficient=0.05)
    ours = harness.run_functrain(ft.lars(**kwargs), params, 5)
    theirs = harness.run_reference(references.Lars, kwargs, params, 5)
    assert harness.relative_error(ours, theirs) < 1e-12


def test_trust_ratio_bf16_keeps_dtype():
    tx = ft.lamb(lr=1e-2, weight_decay=0.1)
    params = harness.make_params(torch.bfloat16)
    state = tx.init(params)
    updates, state = tx.update(harness.gradient(params, 0), state, params)
    assert all(u.dtype == torch.bfloat16 and torch.isfinite(u).all() for u in updates.values())


def _package_run(params, kwargs, steps):
    tensors = [v.clone().requires_grad_(True) for v in params.values()]
    opt = schedulefree.AdamWScheduleFree(tensors, foreach=False, **kwargs)
    opt.train()
    for t in range(steps):
        grads = harness.gradient(dict(zip(params, (v.detach() for v in tensors))), t)
        for v, g in zip(tensors, grads.values()):
            v.grad = g.clone()
        opt.step()
    train = {k: v.detach().clone() for k, v in zip(params, tensors)}
    opt.eval()
    return train, {k: v.detach().clone() for k, v in zip(params, tensors)}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.01),
        dict(lr=0.01, betas=(0.5, 0.9), warmup_steps=5, weight_decay=0.1, r=1.0, weight_lr_power=0.0),
        dict(lr=0.0),  # every averaging weight is 0: c = 0, nothing moves
    ],
)
def test_schedule_free_eval_params_match_package(kwargs):
    params = harness.make_params(torch.float64)
    tx = ft.schedule_free_adamw(**kwargs)
    state, y = tx.init(params), params
    for t in range(12):
        updates, state = tx.update(harness.gradient(y, t), state, y)
        y = ft.apply_updates(y, updates)
    train, evaluated = _package_run(params, kwargs, 12)
    assert harness.relative_error(y, train) < 1e-12
    before = {k: v.clone() for k, v in y.items()}
    assert harness.relative_error(ft.schedule_free_eval_params(y, state), evaluated) < 1e-12
    assert all(torch.equal(before[k], y[k]) for k in y)  # the train params are left alone


def test_schedule_free_matches_the_packages_explicit_xyz_reference():
    # AdamWScheduleFreeReference stores x, y and z and forms y = (1 - b1) z + b1 x directly: an
    # independent check of the in-place y update functrain shares with AdamWScheduleFree.
    kwargs = dict(lr=0.02, warmup_steps=3, weight_decay=0.05, r=0.5)
    params = harness.make_params(torch.float64)
    tx = ft.schedule_free_adamw(**kwargs)
    state, y = tx.init(params), params
    tensors = [v.clone().requires_grad_(True) for v in params.values()]
    opt = schedulefree.AdamWScheduleFreeReference(tensors, **kwargs)
    opt.train()
    for t in range(10):
        grads = harness.gradient(y, t)
        updates, state = tx.update(grads, state, y)
        y = ft.apply_updates(y, updates)
        for v, g in zip(tensors, grads.values()):
            v.grad = g.clone()
        opt.step()
    assert harness.relative_error(y, dict(zip(params, tensors))) < 1e-12
    x = {k: opt.state[v]["x"] for k, v in zip(params, tensors)}
    assert harness.relative_error(ft.schedule_free_eval_params(y, state), x) < 1e-12


def test_schedule_free_eval_params_through_a_schedule():
    # A scheduled lr wraps the chain in inject_hyperparams; the eval point is still found.
    tx = ft.schedule_free_adamw(lr=lambda count: 0.01 * torch.ones_like(count, dtype=torch.float64))
    params = {"w": torch.tensor([1.0, 2.0]), "nested": {"v": torch.tensor([-1.0])}}
    state = tx.init(params)
    updates, state = tx.update({"w": torch.tensor([1.0, -1.0]), "nested": {"v": torch.tensor([2.0])}}, state, params)
    x = ft.schedule_free_eval_params(ft.apply_updates(params, updates), state)
    assert set(x) == {"w", "nested"} and all(math.isfinite(v) for v in x["w"].tolist())
    with pytest.raises(ValueError, match="schedule-free"):
        ft.schedule_free_eval_params(params, ft.adam().init(params))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(betas=(0.0, 0.999)), "betas[0]"),  # x cannot be recovered from y and z when b1 = 0
        (dict(warmup_steps=2.5), "warmup_steps"),
        (dict(r=-1.0), "r"),
        (dict(weight_lr_power=-1.0), "weight_lr_power"),
    ],
)
def test_schedule_free_rejects(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        ft.schedule_free_adamw(**kwargs)
