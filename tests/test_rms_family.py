"""RMSprop, Adagrad, Adadelta, Rprop and ASGD beyond the common battery."""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain import _tree, transforms

from .harness import gradient, make_params, relative_error, run_functrain, run_reference

STEPS = 25
MINE = {
    "rmsprop": (ft.rmsprop, {"lr": 0.01, "centered": True, "momentum": 0.9, "weight_decay": 0.1}),
    "adagrad": (ft.adagrad, {"lr": 0.05, "lr_decay": 0.1, "initial_accumulator_value": 0.5}),
    "adadelta": (ft.adadelta, {"rho": 0.5, "weight_decay": 0.1}),
    "rprop": (ft.rprop, {"etas": (0.3, 1.5), "step_sizes": (1e-3, 0.02), "maximize": True}),
    "asgd": (ft.asgd, {"lr": 0.05, "lambd": 0.1, "t0": 5.0, "weight_decay": 0.1}),
}


def _torch_asgd(params, kwargs, steps, lr_at=None):
    """torch.optim.ASGD's averaged parameters, ``state["ax"]``, after ``steps`` steps."""
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.ASGD(list(tensors.values()), **kwargs)
    for t in range(steps):
        if lr_at is not None:
            opt.param_groups[0]["lr"] = lr_at(t)
        grads = gradient({k: v.detach() for k, v in tensors.items()}, t)
        for k, v in tensors.items():
            v.grad = grads[k]
        opt.step()
    return {k: opt.state[v]["ax"] for k, v in tensors.items()}


def _ours_asgd(params, kwargs, steps):
    tx = ft.asgd(**kwargs)
    state = tx.init(params)
    for t in range(steps):
        updates, state = tx.update(gradient(params, t), state, params)
        params = ft.apply_updates(params, updates)
    return state.inner_state  # the chain inside the ScheduleState


@pytest.fixture
def float64_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("t0", [5.0, 1e6, 0.0])
def test_asgd_average_equals_torch_ax(t0):
    kwargs = {"lr": 0.05, "lambd": 0.1, "t0": t0}
    params = make_params()
    ax = _ours_asgd(params, kwargs, STEPS)[-1].ax
    # torch.optim.ASGD keeps eta and mu in float32 tensors (the default dtype), hence 1e-7, not 1e-15.
    assert relative_error(ax, _torch_asgd(params, kwargs, STEPS)) <= 1e-7


def test_asgd_equals_torch_to_rounding_when_torch_keeps_its_scalars_in_float64(float64_default_dtype):
    kwargs = {"lr": 0.05, "lambd": 0.1, "t0": 5.0, "weight_decay": 0.1}
    params = make_params()
    assert relative_error(_ours_asgd(params, kwargs, STEPS)[-1].ax, _torch_asgd(params, kwargs, STEPS)) <= 1e-14
    ours = run_functrain(ft.asgd(**kwargs), params, STEPS)
    assert relative_error(ours, run_reference(torch.optim.ASGD, kwargs, params, STEPS)) <= 1e-14


def test_asgd_average_follows_an_lr_schedule_as_torch():
    kwargs = {"lambd": 0.1, "t0": 5.0}
    schedule = lambda count: 0.05 * 0.9 ** count.to(torch.float64)  # noqa: E731
    params = make_params()
    ax = _ours_asgd(params, {**kwargs, "lr": schedule}, STEPS)[-1].ax
    assert relative_error(ax, _torch_asgd(params, {**kwargs, "lr": 0.05}, STEPS, lambda t: 0.05 * 0.9**t)) <= 1e-7


@pytest.mark.parametrize("lr_decay", [0.0, 0.1])
def test_adagrad_lr_decay_composes_with_an_lr_schedule(lr_decay):
    kwargs = {"lr": 0.05, "lr_decay": lr_decay, "weight_decay": 0.1}
    schedule = lambda count: 0.05 * 0.9 ** count.to(torch.float64)  # noqa: E731
    params = make_params()
    ours = run_functrain(ft.adagrad(**{**kwargs, "lr": schedule}), params, STEPS)
    expected = run_reference(torch.optim.Adagrad, kwargs, params, STEPS, lr_at=lambda t: 0.05 * 0.9**t)
    assert relative_error(ours, expected) <= 1e-7


@pytest.mark.parametrize("name", ["alpha", "eps", "momentum", "weight_decay"])
def test_rmsprop_schedules_for_other_hyperparameters(name):
    """A constant schedule equals the constant (exercises the injected-tensor path of each argument)."""
    kwargs = MINE["rmsprop"][1]
    params = make_params()
    constant = kwargs.get(name, 1e-8 if name == "eps" else 0.99)
    scheduled = ft.rmsprop(**{**kwargs, name: lambda count: torch.tensor(constant, dtype=torch.float64)})
    assert (
        relative_error(
            run_functrain(scheduled, params, 5), run_functrain(ft.rmsprop(**{**kwargs, name: constant}), params, 5)
        )
        <= 1e-15
    )


def test_rprop_lr_is_read_only_by_init():
    params = make_params()
    ours = run_functrain(ft.rprop(lr=lambda count: 0.01 * 10.0 ** count.to(torch.float64)), params, 5)
    assert relative_error(ours, run_functrain(ft.rprop(lr=0.01), params, 5)) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MINE))
def test_update_compiles_without_graph_breaks_and_equals_eager(name):
    torch._dynamo.reset()
    factory, kwargs = MINE[name]
    tx = factory(**kwargs)
    params = make_params(torch.float32)
    compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    state_c = state_e = tx.init(params)
    for t in range(3):
        grads = gradient(params, t)
        updates_c, state_c = compiled(grads, state_c, params)
        updates_e, state_e = tx.update(grads, state_e, params)
        assert relative_error(updates_c, updates_e) <= 1e-6
        params = ft.apply_updates(params, updates_e)


# ----------------------------------------------------------------------------- the transforms alone


def test_scale_by_rms_initial_scale_is_the_first_second_moment():
    g = {"w": torch.tensor([3.0, -4.0], dtype=torch.float64)}
    tx = transforms.scale_by_rms(alpha=0.5, eps=0.0, initial_scale=2.0)
    out, state = tx.update(g, tx.init(g))
    torch.testing.assert_close(state.nu["w"], 0.5 * 2.0 + 0.5 * g["w"] ** 2)
    torch.testing.assert_close(out["w"], g["w"] / state.nu["w"].sqrt())


def test_scale_by_stddev_divides_by_the_centred_second_moment():
    g = {"w": torch.tensor([3.0, -4.0], dtype=torch.float64)}
    tx = transforms.scale_by_stddev(alpha=0.5, eps=0.0)
    out, state = tx.update(g, tx.init(g))
    torch.testing.assert_close(out["w"], g["w"] / (0.5 * g["w"] ** 2 - (0.5 * g["w"]) ** 2).sqrt())


def test_polyak_averaging_passes_updates_through_and_needs_params():
    params = {"w": torch.tensor([1.0, 2.0])}
    tx = transforms.polyak_averaging(t0=0.0)
    state = tx.init(params)
    updates = {"w": torch.tensor([0.5, 0.5])}
    out, state = tx.update(updates, state, params)
    assert out is updates
    torch.testing.assert_close(state.ax["w"], torch.tensor([1.5, 2.5]))
    with pytest.raises(ValueError, match="params"):
        tx.update(updates, state)


@pytest.mark.parametrize(
    "kwargs,argument",
    [({"etas": (0.5,)}, "etas"), ({"step_sizes": (-1.0, 1.0)}, "step_sizes"), ({"etas": (0.5, 1.0)}, "etas")],
)
def test_rprop_rejects_bad_pairs(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        ft.rprop(**kwargs)


RMS_TRANSFORMS = {
    "scale_by_rms": lambda h: transforms.scale_by_rms(h(0.9), h(1e-3), h(0.5)),
    "scale_by_stddev": lambda h: transforms.scale_by_stddev(h(0.9), h(1e-3), h(0.5)),
    "scale_by_rss": lambda h: transforms.scale_by_rss(h(0.5), h(1e-3)),
    "scale_by_adadelta": lambda h: transforms.scale_by_adadelta(h(0.5), h(1e-3)),
}


@pytest.mark.parametrize("name", list(RMS_TRANSFORMS))
@pytest.mark.parametrize("tensor_hyperparameters", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_multi_tensor_path_equals_per_leaf_to_the_bit(name, tensor_hyperparameters, dtype, monkeypatch):
    as_given = (lambda v: torch.tensor(v, dtype=torch.float64)) if tensor_hyperparameters else (lambda v: v)
    tx = RMS_TRANSFORMS[name](as_given)
    params = make_params(dtype)
    fast = run_functrain(tx, params, 5)
    monkeypatch.setattr(_tree, "fast_path_ok", lambda leaves: False)
    per_leaf = run_functrain(tx, params, 5)
    assert all(torch.equal(fast[k], per_leaf[k]) for k in params)
