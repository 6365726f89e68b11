"""``@schedulable``: every optimiser's state is ``ScheduleState(count, inner_state)``, whatever its
arguments are (floats, ints, 0-d tensors, schedules, tuples of them), so a checkpoint of a
constant-rate run loads into a scheduled one and the reverse, and schedules resume where they were."""

from __future__ import annotations

import inspect
import io

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_structure

import functrain as ft

from .harness import gradient, make_params, relative_error
from .registry import SPECS

EACH = [pytest.param(spec, id=spec.name) for spec in SPECS]
# Specs whose factory takes a (beta1, beta2) pair.
WITH_BETAS = [pytest.param(spec, id=spec.name) for spec in SPECS if "betas" in inspect.signature(spec.make).parameters]
# A float lr and the same lr as a 0-d float64 tensor (what a schedule's value is) run different but
# equivalent arithmetic in these two (float64: a last-bit difference); the others are bit for bit.
ROUNDS_DIFFERENTLY = {"asgd", "muon"}


def first_case(spec):
    return spec.cases()[0]


def base_lr(spec) -> float:
    kwargs = first_case(spec)
    return kwargs.get("lr", inspect.signature(spec.make).parameters["lr"].default)


def constant(value: float):
    """A schedule of constant value: ``ConstantLR`` with ``factor=1``."""
    return ft.schedules.constant_lr(value, factor=1.0)


def run(tx, params, steps: range, state=None):
    state = tx.init(params) if state is None else state
    for t in steps:
        updates, state = tx.update(gradient(params, t), state, params)
        params = ft.apply_updates(params, updates)
    return params, state


def layout(state):
    """The tree structure and each leaf's (shape, dtype, device)."""
    leaves, spec = tree_flatten(state)
    return spec, [(t.shape, t.dtype, t.device) for t in leaves]


# ----------------------------------------------------------------------------- one structure


@pytest.mark.parametrize("spec", EACH)
def test_state_structure_is_the_same_for_a_float_an_int_a_tensor_and_a_schedule_lr(spec):
    kwargs, lr = first_case(spec), base_lr(spec)
    params = make_params(torch.float32, matrices_only=spec.matrices_only)
    variants = [lr, 1, torch.tensor(lr, dtype=torch.float64), torch.tensor(lr), constant(lr), lambda count: lr]
    states = [spec.make(**{**kwargs, "lr": value}).init(params) for value in variants]
    for state in states:
        assert isinstance(state, ft.ScheduleState)
        assert state.count.dtype == torch.int64 and state.count.shape == () and int(state.count) == 0
        assert layout(state) == layout(states[0])
    # ... and after updates, which a schedule drives differently.
    after = [run(spec.make(**{**kwargs, "lr": value}), params, range(2))[1] for value in (lr, constant(lr))]
    assert layout(after[0]) == layout(after[1]) == layout(states[0])
    assert int(after[0].count) == int(after[1].count) == 2


@pytest.mark.parametrize("spec", WITH_BETAS)
def test_state_structure_is_the_same_with_a_scheduled_beta(spec):
    kwargs = first_case(spec)
    betas = kwargs.get("betas", inspect.signature(spec.make).parameters["betas"].default)
    params = make_params(torch.float32, matrices_only=spec.matrices_only)
    plain = spec.make(**kwargs).init(params)
    scheduled = spec.make(**{**kwargs, "betas": (constant(betas[0]), betas[1])}).init(params)
    both = spec.make(**{**kwargs, "lr": constant(base_lr(spec)), "betas": (betas[0], constant(betas[1]))})
    assert layout(scheduled) == layout(plain) == layout(both.init(params))
    assert tree_structure(run(both, params, range(2))[1]) == tree_structure(plain)


@pytest.mark.parametrize("spec", WITH_BETAS)
def test_a_scheduled_beta_equals_the_constant_beta(spec):
    kwargs = first_case(spec)
    betas = kwargs.get("betas", inspect.signature(spec.make).parameters["betas"].default)
    params = make_params(matrices_only=spec.matrices_only)
    # With one item scheduled, the pair is passed as 0-d float64 tensors: compare with that.
    as_tensors = tuple(torch.tensor(b, dtype=torch.float64) for b in betas)
    expected, _ = run(spec.make(**{**kwargs, "betas": as_tensors}), params, range(6))
    ours, _ = run(spec.make(**{**kwargs, "betas": (constant(betas[0]), betas[1])}), params, range(6))
    assert all(torch.equal(ours[k], expected[k]) for k in params)


# ----------------------------------------------------------------------------- checkpoints across the two


def compare(spec, ours, expected):
    if spec.name in ROUNDS_DIFFERENTLY:
        assert relative_error(ours, expected) <= 1e-14
    else:
        assert all(torch.equal(ours[k], expected[k]) for k in expected), spec.name


@pytest.mark.parametrize("spec", EACH)
def test_a_constant_lr_checkpoint_continues_a_scheduled_run_and_back(spec, tmp_path):
    """Saved from a float-lr run, loaded (``ft.load_checkpoint``, weights_only) into a run with a
    constant schedule of the same value: continuing it equals the run scheduled throughout."""
    kwargs, lr = first_case(spec), base_lr(spec)
    params = make_params(matrices_only=spec.matrices_only)
    plain, scheduled = spec.make(**kwargs), spec.make(**{**kwargs, "lr": constant(lr)})
    expected, _ = run(scheduled, params, range(6))

    for first, then in ((plain, scheduled), (scheduled, plain)):
        halfway = dict(zip(("params", "opt_state"), run(first, params, range(3))))
        path = ft.save_checkpoint(tmp_path / "ckpt.pt", halfway)
        like = {"params": params, "opt_state": then.init(params)}
        loaded, _ = ft.load_checkpoint(path, like=like, restore_rng=False)
        assert int(loaded["opt_state"].count) == 3
        ours, _ = run(then, loaded["params"], range(3, 6), loaded["opt_state"])
        compare(spec, ours, expected)


@pytest.mark.parametrize("spec", EACH)
def test_a_checkpoint_resumes_the_schedule_where_it_was(spec):
    """A decaying schedule, saved and loaded with torch.save / torch.load(weights_only=True)."""
    kwargs, lr = first_case(spec), base_lr(spec)
    params = make_params(matrices_only=spec.matrices_only)
    tx = spec.make(**{**kwargs, "lr": lambda count: lr * 0.8 ** count.to(torch.float64)})
    uninterrupted, _ = run(tx, params, range(6))
    buffer = io.BytesIO()
    torch.save(run(tx, params, range(3)), buffer)
    buffer.seek(0)
    halfway, state = torch.load(buffer, weights_only=True)
    resumed, _ = run(tx, halfway, range(3, 6), state)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in params)


# ----------------------------------------------------------------------------- where the schedule is evaluated


def test_the_schedule_is_evaluated_at_the_count_like_an_lr_scheduler():
    """ft.adamw with a cosine schedule equals torch.optim.AdamW stepped with CosineAnnealingLR, and a
    state converted from torch halfway (opt_state_from_torch sets the count) continues the schedule."""
    params = make_params()
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.AdamW(list(tensors.values()), lr=0.05, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=0.005)
    tx = ft.adamw(lr=ft.schedules.cosine_annealing_lr(0.05, T_max=7, eta_min=0.005), weight_decay=0.1)

    def torch_steps(steps):
        for t in steps:
            grads = gradient({k: v.detach() for k, v in tensors.items()}, t)
            for k, v in tensors.items():
                v.grad = grads[k]
            opt.step()
            scheduler.step()

    ours, state = run(tx, params, range(10))
    torch_steps(range(4))
    converted = ft.opt_state_from_torch(tx, {k: v.detach() for k, v in tensors.items()}, opt)
    assert int(converted.count) == 4 and int(converted.inner_state[0].count) == 4
    continued, _ = run(tx, {k: v.detach().clone() for k, v in tensors.items()}, range(4, 10), converted)
    torch_steps(range(4, 10))
    expected = {k: v.detach() for k, v in tensors.items()}
    assert relative_error(ours, expected) <= 1e-7 and relative_error(continued, expected) <= 1e-7
    assert int(state.count) == 10


def test_a_state_converts_to_torch_with_its_count_where_the_inner_state_has_none():
    """rmsprop's transforms keep no count, but its ScheduleState does: torch gets that as its step."""
    params = make_params()
    tx = ft.rmsprop(lr=0.01)
    _, state = run(tx, params, range(3))
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.RMSprop(list(tensors.values()), lr=0.01)
    ft.load_into_torch(opt, state, params)
    assert all(float(opt.state[p]["step"]) == 3.0 for p in tensors.values())


def test_schedules_are_checked_at_count_zero_when_built():
    with pytest.raises(ValueError, match="lr"):
        ft.adam(lr=lambda count: -0.1 + 0.0 * count.to(torch.float64))
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        ft.adam(betas=(lambda count: 1.5 + 0.0 * count.to(torch.float64), 0.999))


# ----------------------------------------------------------------------------- what the wrapper passes on


def test_the_fast_path_is_passed_on_and_equals_the_pure_step():
    params = make_params(torch.float32)
    tx = ft.adamw(lr=1e-2, weight_decay=0.1)
    assert tx.update_and_apply is not None  # the fused kernel of the inner chain, declared through the wrapper
    state = tx.init(params)
    reference_updates, reference_state = tx.update(gradient(params, 0), state, params)
    reference = ft.apply_updates(params, reference_updates)
    new_params, new_state = ft.update_and_apply(tx, gradient(params, 0), state, params)
    torch.testing.assert_close(new_params, reference, rtol=1e-6, atol=1e-7)
    assert int(new_state.count) == 1 and int(state.count) == 0  # pure: the input state is as it was
    donated = {k: v.clone() for k, v in params.items()}
    donated_state = tx.init(donated)
    mu = donated_state.inner_state[0].mu
    out, out_state = ft.update_and_apply(tx, gradient(params, 0), donated_state, donated, donate=True)
    assert all(out[k] is donated[k] for k in params) and out_state.inner_state[0].mu["w"] is mu["w"]
    assert all(torch.equal(out[k], new_params[k]) for k in params)
    # Scheduled, the inner transform is rebuilt from tensors each step: the fused kernel takes floats.
    assert ft.adamw(lr=constant(1e-2)).update_and_apply is None


def test_extra_arguments_reach_the_inner_update():
    seen = []

    @ft.wrappers.schedulable
    def scaled(lr: ft.Hyperparameter = 1.0) -> ft.GradientTransformation:
        def update(updates, state, params=None, **extra):
            seen.append(extra.get("value"))
            return {k: -lr * u for k, u in updates.items()}, state

        return ft.GradientTransformation(ft.base.empty_init, update)

    params = {"w": torch.ones(2)}
    for tx in (scaled(lr=0.5), scaled(lr=constant(0.5))):
        state = tx.init(params)
        updates, state = tx.update({"w": torch.ones(2)}, state, params, value=torch.tensor(3.0))
        assert torch.equal(updates["w"], torch.full((2,), -0.5)) and int(state.count) == 1
        _, state = ft.update_and_apply(tx, {"w": torch.ones(2)}, state, params, value=torch.tensor(4.0))
        assert int(state.count) == 2
    assert [float(v) for v in seen] == [3.0, 4.0, 3.0, 4.0]


def test_inject_hyperparams_drives_a_schedulable_factory():
    params = make_params()
    tx = ft.inject_hyperparams(ft.adam)(lr=lambda count: 0.01 * 0.9 ** count.to(torch.float64))
    state = tx.init(params)
    assert isinstance(state, ft.wrappers.InjectHyperparamsState) and isinstance(state.inner_state, ft.ScheduleState)
    ours, state = run(tx, params, range(4))
    expected, _ = run(ft.adam(lr=lambda count: 0.01 * 0.9 ** count.to(torch.float64)), params, range(4))
    assert relative_error(ours, expected) <= 1e-15
    assert int(state.count) == int(state.inner_state.count) == 4
    assert float(ft.hyperparams(state)["lr"]) == pytest.approx(0.01 * 0.9**3)
    assert float(ft.set_hyperparams(state, eps=1e-6).hyperparams["eps"]) == 1e-6


def test_a_scheduled_optimiser_vmaps():
    params = make_params(torch.float32)
    stacked = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    grads = {k: torch.stack([g, -g]) for k, g in gradient(params, 0).items()}
    tx = ft.adam(lr=ft.schedules.linear_lr(0.1, total_iters=4), betas=(constant(0.9), 0.999))
    state = torch.func.vmap(tx.init)(stacked)
    for _ in range(2):
        updates, state = torch.func.vmap(tx.update)(grads, state, stacked)
    assert state.count.tolist() == [2, 2]
    for i in range(2):
        one = {k: v[i] for k, v in stacked.items()}
        one_state = tx.init(one)
        for _ in range(2):
            expected, one_state = tx.update({k: g[i] for k, g in grads.items()}, one_state, one)
        torch.testing.assert_close({k: u[i] for k, u in updates.items()}, expected)


# ----------------------------------------------------------------------------- compiled


@pytest.mark.slow
def test_a_compiled_scheduled_update_equals_eager_and_never_recompiles():
    torch._dynamo.reset()
    tx = ft.adamw(
        lr=ft.schedules.cosine_annealing_lr(0.05, T_max=5), betas=(ft.schedules.linear_lr(0.9, total_iters=3), 0.999)
    )
    params = make_params(torch.float32)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return ft.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True)
    eager_params, eager_state = params, tx.init(params)
    state = tx.init(params)
    params, state = compiled(params, state, gradient(params, 0))
    eager_params, eager_state = step(eager_params, eager_state, gradient(eager_params, 0))
    with torch.compiler.set_stance("fail_on_recompile"):
        for t in range(1, 6):
            params, state = compiled(params, state, gradient(params, t))
            eager_params, eager_state = step(eager_params, eager_state, gradient(eager_params, t))
    assert int(state.count) == 6
    assert relative_error(params, eager_params) <= 1e-5
    assert tree_structure(state) == tree_structure(eager_state)
