"""torch.optim interop: state conversion both ways, and functrain transforms behind torch.optim's interface.

Conversions are checked by trajectories: 5 steps on one side, convert, 5 on the other must equal 10
steps of torch.optim alone (float64). The adapter is checked against torch.optim in imperative loops.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import functrain as ft
from functrain import _tree

from .harness import gradient, make_params, relative_error, run_reference
from .registry import BY_NAME, TORCH_OPTIM_MIRRORS

HALF = 5


def _representative(cases: list[dict]) -> list[int]:
    """First, middle and last option sets: the grids put option-dependent state (amsgrad, centered,
    momentum, nesterov) on their first axes, so these cover both values of each."""
    return sorted({0, len(cases) // 2, len(cases) - 1})


CASES = [
    pytest.param(BY_NAME[name], BY_NAME[name].cases()[i], id=f"{name}-{i}")
    for name in TORCH_OPTIM_MIRRORS
    for i in _representative(BY_NAME[name].cases())
] + [pytest.param(BY_NAME["asgd"], {"lr": 0.05, "t0": 2.0}, id="asgd-averaging")]  # ax, mu change mid-run


def _torch_steps(opt: torch.optim.Optimizer, tensors: dict, steps: range) -> None:
    for t in steps:
        grads = gradient({k: v.detach() for k, v in tensors.items()}, t)
        for k, v in tensors.items():
            v.grad = grads[k].clone()
        opt.step()


def _functrain_steps(tx, state, params: dict, steps: range):
    for t in steps:
        updates, state = tx.update(gradient(params, t), state, params)
        params = ft.apply_updates(params, updates)
    return state, params


def _leaf_tensors(params: dict) -> dict:
    return {k: v.clone().requires_grad_(True) for k, v in params.items()}


# ----------------------------------------------------------------------------- torch -> functrain


@pytest.mark.parametrize("spec,kwargs", CASES)
def test_torch_then_functrain_equals_torch(spec, kwargs):
    params = make_params(matrices_only=spec.matrices_only)
    tensors = _leaf_tensors(params)
    opt = spec.reference(list(tensors.values()), **kwargs)
    _torch_steps(opt, tensors, range(HALF))
    tx, state, ours = ft.from_torch_optimizer(opt, tensors)
    assert list(ours) == list(params)
    _, ours = _functrain_steps(tx, state, ours, range(HALF, 2 * HALF))
    expected = run_reference(spec.reference, kwargs, params, 2 * HALF)
    assert relative_error(ours, expected) <= 1e-7


@pytest.mark.parametrize("spec,kwargs", CASES)
def test_converted_state_equals_functrain_state(spec, kwargs):
    """Leaf for leaf (dtype included), the converted state is what functrain reaches on its own."""
    params = make_params(matrices_only=spec.matrices_only)
    tensors = _leaf_tensors(params)
    opt = spec.reference(list(tensors.values()), **kwargs)
    _torch_steps(opt, tensors, range(HALF))
    tx = spec.make(**kwargs)
    # step: torch.optim.SGD and Muon keep no count (without it, any state reads as 1 step)
    converted = ft.opt_state_from_torch(tx, {k: v.detach() for k, v in tensors.items()}, opt, step=HALF)
    native, _ = _functrain_steps(tx, tx.init(params), params, range(HALF))
    _tree.check_same_structure(converted, native)
    for (name, a), b in zip(_tree.named_leaves(converted), _tree.leaves(native)):
        assert a.dtype == b.dtype, name
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-12), name


# ----------------------------------------------------------------------------- functrain -> torch


@pytest.mark.parametrize("spec,kwargs", CASES)
def test_functrain_then_torch_equals_torch(spec, kwargs):
    params = make_params(matrices_only=spec.matrices_only)
    tx = spec.make(**kwargs)
    state, ours = _functrain_steps(tx, tx.init(params), params, range(HALF))
    tensors = _leaf_tensors(ours)
    opt = spec.reference(list(tensors.values()), **kwargs)
    ft.load_into_torch(opt, state, ours, step=HALF)  # step: rmsprop, adadelta, rprop keep no count
    _torch_steps(opt, tensors, range(HALF, 2 * HALF))

    reference = _leaf_tensors(params)
    reference_opt = spec.reference(list(reference.values()), **kwargs)
    _torch_steps(reference_opt, reference, range(2 * HALF))
    assert relative_error({k: v.detach() for k, v in tensors.items()}, reference) <= 1e-7
    # the whole torch state too, e.g. ASGD's average, which the parameters never read
    for i, (ours_state, their_state) in enumerate(
        zip(opt.state_dict()["state"].values(), reference_opt.state_dict()["state"].values(), strict=True)
    ):
        assert sorted(ours_state) == sorted(their_state)
        for key, value in their_state.items():
            assert torch.allclose(ours_state[key].double(), value.double(), rtol=1e-6, atol=1e-12), (i, key)


@pytest.mark.parametrize("name", ["adam", "sgd", "adagrad", "asgd", "nadam"])
def test_round_trip_torch_functrain_torch_is_exact(name):
    spec = BY_NAME[name]
    kwargs = spec.cases()[-1]
    params = make_params()
    tensors = _leaf_tensors(params)
    opt = spec.reference(list(tensors.values()), **kwargs)
    _torch_steps(opt, tensors, range(3))
    _, state, ours = ft.from_torch_optimizer(opt, tensors)
    other = spec.reference(list(_leaf_tensors(params).values()), **kwargs)
    ft.load_into_torch(other, state, ours)
    for a, b in zip(opt.state_dict()["state"].values(), other.state_dict()["state"].values(), strict=True):
        assert sorted(a) == sorted(b)
        for key in a:
            assert torch.equal(a[key].to(b[key].dtype), b[key]), key


def test_fresh_state_loads_as_no_torch_state():
    """A count of 0 is torch's lazily built state: none (SGD's first step differs with a zero buffer)."""
    params = make_params()
    tx = ft.sgd(lr=0.1, momentum=0.9, dampening=0.3)
    opt = torch.optim.SGD(list(_leaf_tensors(params).values()), lr=0.1, momentum=0.9, dampening=0.3)
    tensors = dict(zip(params, opt.param_groups[0]["params"]))
    ft.load_into_torch(opt, tx.init(params), params)
    assert len(opt.state) == 0
    _torch_steps(opt, tensors, range(HALF))
    expected = run_reference(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}, params, HALF)
    assert relative_error({k: v.detach() for k, v in tensors.items()}, expected) == 0.0


# ----------------------------------------------------------------------------- param groups, wrappers


def test_param_groups_become_a_partition():
    params = make_params()
    tensors = _leaf_tensors(params)

    def grouped(ts):
        matrices = [t for k, t in ts.items() if params[k].ndim >= 2]
        others = [t for k, t in ts.items() if params[k].ndim < 2]
        return torch.optim.AdamW(
            [{"params": matrices, "weight_decay": 0.1}, {"params": others, "lr": 0.03, "weight_decay": 0.0}], lr=0.01
        )

    # torch numbers parameters group by group, so the params come back in that order
    order = [k for k in params if params[k].ndim >= 2] + [k for k in params if params[k].ndim < 2]
    opt = grouped({k: tensors[k] for k in order})
    _torch_steps(opt, {k: tensors[k] for k in order}, range(HALF))
    tx, state, ours = ft.from_torch_optimizer(opt, tensors)
    assert list(ours) == order
    assert sorted(state.inner_states) == ["group0", "group1"]
    _, ours = _functrain_steps(tx, state, ours, range(HALF, 2 * HALF))

    reference = _leaf_tensors({k: params[k] for k in order})
    _torch_steps(grouped(reference), reference, range(2 * HALF))
    assert relative_error(ours, {k: v.detach() for k, v in reference.items()}) <= 1e-7


def test_injected_hyperparameters_convert_with_the_count():
    params = make_params()
    tensors = _leaf_tensors(params)
    opt = torch.optim.Adam(list(tensors.values()), lr=0.01, amsgrad=True)
    _torch_steps(opt, tensors, range(HALF))
    tx = ft.inject_hyperparams(ft.adam)(lr=0.01, amsgrad=True)
    state = ft.opt_state_from_torch(tx, {k: v.detach() for k, v in tensors.items()}, opt)
    assert state.count.item() == HALF and state.inner_state.inner_state[0].count.item() == HALF
    _, ours = _functrain_steps(tx, state, {k: v.detach() for k, v in tensors.items()}, range(HALF, 2 * HALF))
    expected = run_reference(torch.optim.Adam, {"lr": 0.01, "amsgrad": True}, params, 2 * HALF)
    assert relative_error(ours, expected) <= 1e-7

    back = torch.optim.Adam(list(_leaf_tensors(params).values()), lr=0.01, amsgrad=True)
    ft.load_into_torch(back, state, params)
    assert all(s["step"].item() == HALF for s in back.state.values())


def test_frozen_parameters_without_state_convert_through_a_partition():
    """torch.optim builds no state for parameters that never get a gradient; a partition that gives
    them ft.set_to_zero() holds none either, so the state converts both ways."""
    params = make_params()
    trainable = ["w", "t"]

    def train_some(opt, tensors, steps):
        for t in steps:
            grads = gradient({k: v.detach() for k, v in tensors.items()}, t)
            for k in trainable:
                tensors[k].grad = grads[k].clone()
            opt.step()

    tensors = _leaf_tensors(params)
    opt = torch.optim.Adam(list(tensors.values()), lr=0.01)
    train_some(opt, tensors, range(HALF))
    with pytest.raises(ValueError, match="parameter 'b' has no torch.optim.Adam state"):
        ft.from_torch_optimizer(opt, tensors)
    tx = ft.partition(
        {"train": ft.adam(lr=0.01), "frozen": ft.set_to_zero()},
        lambda name, p: "train" if name in trainable else "frozen",
    )
    ours = {k: v.detach() for k, v in tensors.items()}
    state = ft.opt_state_from_torch(tx, ours, opt)
    back = torch.optim.Adam(list(_leaf_tensors(params).values()), lr=0.01)
    ft.load_into_torch(back, state, ours)
    assert sorted(back.state_dict()["state"]) == [0, 2]  # w and t

    _, ours = _functrain_steps(tx, state, ours, range(HALF, 2 * HALF))
    reference = _leaf_tensors(params)
    train_some(torch.optim.Adam(list(reference.values()), lr=0.01), reference, range(2 * HALF))
    assert relative_error(ours, {k: v.detach() for k, v in reference.items()}) <= 1e-7


# ----------------------------------------------------------------------------- bad input


def test_unsupported_optimizer_lists_the_supported_ones():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"LBFGS has no functrain mirror; supported: torch.optim.SGD, .*Muon"):
        ft.from_torch_optimizer(torch.optim.LBFGS([w]))


def test_per_parameter_steps_that_differ_are_refused():
    a, b = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = torch.optim.Adam([a, b])
    a.grad = torch.ones(2)
    opt.step()  # b has no gradient: torch skips it and builds no state for it
    with pytest.raises(ValueError, match="parameter 'b' has no torch.optim.Adam state"):
        ft.from_torch_optimizer(opt, {"a": a, "b": b})
    b.grad = torch.ones(3)
    opt.step()
    with pytest.raises(ValueError, match="per-parameter steps differ: 'b' has taken 1, 'a' 2"):
        ft.from_torch_optimizer(opt, {"a": a, "b": b})


def test_option_mismatch_names_the_torch_key():
    params = make_params()
    tensors = _leaf_tensors(params)
    opt = torch.optim.Adam(list(tensors.values()), amsgrad=True)
    _torch_steps(opt, tensors, range(2))
    with pytest.raises(ValueError, match="'max_exp_avg_sq' of parameter 'w' has no place"):
        ft.opt_state_from_torch(ft.adam(), {k: v.detach() for k, v in tensors.items()}, opt)

    tx = ft.adam()
    state, _ = _functrain_steps(tx, tx.init(params), params, range(2))
    with pytest.raises(ValueError, match="needs 'max_exp_avg_sq', which opt_state does not hold"):
        ft.load_into_torch(opt, state, params)
    with pytest.raises(ValueError, match="ScaleByAdamState, whose 'mu' has no counterpart in torch.optim.SGD"):
        ft.load_into_torch(torch.optim.SGD(list(tensors.values()), momentum=0.9), state, params)


def test_missing_step_count_is_asked_for():
    params = make_params()
    tx = ft.rmsprop()
    state, _ = _functrain_steps(tx, tx.init(params), params, range(2))
    with pytest.raises(ValueError, match="pass step="):
        ft.load_into_torch(torch.optim.RMSprop(list(_leaf_tensors(params).values())), state.inner_state, params)


def test_params_must_match_the_optimizer():
    params = make_params()
    opt = torch.optim.Adam(list(_leaf_tensors(params).values()))
    with pytest.raises(ValueError, match="params has 3 tensors, the torch optimizer 4"):
        ft.opt_state_from_torch(ft.adam(), {k: params[k] for k in ["w", "b", "t"]}, opt)
    with pytest.raises(ValueError, match="named_params does not name the torch optimizer's parameter 0"):
        ft.from_torch_optimizer(opt, {"x": torch.zeros(1)})


# ----------------------------------------------------------------------------- the adapter


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()


def _batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)


def _train(model, opt, steps: range, scheduler=None) -> list[float]:
    lrs = []
    for t in steps:
        x, y = _batch(t)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        lrs.append(opt.param_groups[0]["lr"] if "lr" in opt.param_groups[0] else None)
        if scheduler is not None:
            scheduler.step()
    return lrs


def _params_of(model) -> dict:
    return {k: v.detach() for k, v in model.named_parameters()}


def test_adapter_equals_torch_adamw_in_an_imperative_loop():
    ours, theirs = _model(), _model()
    _train(ours, ft.TorchOptimizer(ours.parameters(), ft.adamw(lr=0.01, weight_decay=0.1)), range(10))
    _train(theirs, torch.optim.AdamW(theirs.parameters(), lr=0.01, weight_decay=0.1), range(10))
    assert relative_error(_params_of(ours), _params_of(theirs)) <= 1e-12


def test_adapter_state_dict_round_trip_mid_run():
    straight, resumed = _model(), _model()
    _train(straight, ft.TorchOptimizer(straight.parameters(), ft.nadam(lr=0.01)), range(10))

    opt = ft.TorchOptimizer(resumed.parameters(), ft.nadam(lr=0.01))
    _train(resumed, opt, range(5))
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = _model(seed=1)
    fresh.load_state_dict(saved["model"])
    opt = ft.TorchOptimizer(fresh.parameters(), ft.nadam(lr=0.01))
    opt.load_state_dict(saved["opt"])
    _train(fresh, opt, range(5, 10))
    assert relative_error(_params_of(fresh), _params_of(straight)) == 0.0


def test_adapter_runs_a_partition_by_parameter_name():
    ours, theirs = _model(), _model()
    tx = ft.partition(
        {"decay": ft.adamw(lr=0.01, weight_decay=0.1), "no_decay": ft.adam(lr=0.02)},
        lambda name, p: "no_decay" if name.endswith("bias") else "decay",
    )
    _train(ours, ft.TorchOptimizer(ours.named_parameters(), tx), range(10))
    groups = [
        {"params": [p for n, p in theirs.named_parameters() if not n.endswith("bias")], "weight_decay": 0.1},
        {"params": [p for n, p in theirs.named_parameters() if n.endswith("bias")], "lr": 0.02, "weight_decay": 0.0},
    ]
    _train(theirs, torch.optim.AdamW(groups, lr=0.01), range(10))
    assert relative_error(_params_of(ours), _params_of(theirs)) <= 1e-12


def test_adapter_follows_an_lr_scheduler_through_injected_hyperparameters():
    ours, theirs = _model(), _model()
    opt = ft.TorchOptimizer(ours.parameters(), ft.inject_hyperparams(ft.adamw)(lr=0.05, betas=(0.8, 0.99)))
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["betas"] == (0.8, 0.99)
    our_lrs = _train(ours, opt, range(10), torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5))
    reference = torch.optim.AdamW(theirs.parameters(), lr=0.05, betas=(0.8, 0.99))
    their_lrs = _train(theirs, reference, range(10), torch.optim.lr_scheduler.StepLR(reference, step_size=3, gamma=0.5))
    assert our_lrs == their_lrs and len(set(our_lrs)) == 4
    assert opt.opt_state.hyperparams["lr"].item() == their_lrs[-1]
    assert relative_error(_params_of(ours), _params_of(theirs)) <= 1e-12


def test_adapter_closure_and_missing_gradients():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    opt = ft.TorchOptimizer([w, frozen], ft.sgd(lr=0.1, weight_decay=0.5))

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 5.0
    # w - lr * (2 w + weight_decay * w)
    assert torch.equal(w.detach(), torch.tensor([0.75, -1.5], dtype=torch.float64))
    # no gradient is a zero gradient: weight decay still moves the parameter (documented)
    assert torch.equal(frozen.detach(), torch.tensor([3.0 - 0.1 * 0.5 * 3.0], dtype=torch.float64))


def test_adapter_converts_to_torch_optim():
    """TorchOptimizer.opt_state is a functrain state: it loads into torch.optim like any other."""
    ours, theirs = _model(), _model()
    opt = ft.TorchOptimizer(ours.named_parameters(), ft.adam(lr=0.01, amsgrad=True))
    _train(ours, opt, range(5))
    continued = copy.deepcopy(ours)
    torch_opt = torch.optim.Adam(continued.parameters(), lr=0.01, amsgrad=True)
    ft.load_into_torch(torch_opt, opt.opt_state, _params_of(ours))
    _train(continued, torch_opt, range(5, 10))
    _train(theirs, torch.optim.Adam(theirs.parameters(), lr=0.01, amsgrad=True), range(10))
    assert relative_error(_params_of(continued), _params_of(theirs)) <= 1e-12


def test_adapter_rejects_groups_and_mismatched_state():
    model = _model()
    with pytest.raises(TypeError, match="not param group dicts"):
        ft.TorchOptimizer([{"params": model.parameters()}], ft.adam())
    opt = ft.TorchOptimizer(model.parameters(), ft.adam())
    with pytest.raises(NotImplementedError, match="build a new TorchOptimizer"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    other = ft.TorchOptimizer(model.parameters(), ft.adam(amsgrad=True))
    with pytest.raises(_tree.TreeMismatchError, match="nu_max"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="opt_state_from_torch"):
        opt.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())


def test_torch_optimizer_shows_every_injected_hyperparameter_and_names_missing_ones():
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = ft.TorchOptimizer([w], ft.inject_hyperparams(ft.adam)(lr=1))
    group = {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "param_names")}
    assert group == {"lr": 1.0, "betas": (0.9, 0.999), "eps": 1e-8}  # torch.optim.Adam's defaults, as numbers
    plain = ft.TorchOptimizer([w], ft.adam(lr=0.1))
    with pytest.raises(KeyError, match=r"has no 'lr'.*ft.inject_hyperparams"):
        torch.optim.lr_scheduler.StepLR(plain, 1)
    plain.load_state_dict(plain.state_dict())
    with pytest.raises(KeyError, match="ft.inject_hyperparams"):
        plain.param_groups[0]["lr"]


def test_int_group_values_become_floats_only_for_float_hyperparameters():
    from functrain.interop._convert import _factory_kwargs

    kwargs = _factory_kwargs(ft.schedule_free_adamw, {"lr": 1, "weight_decay": 0, "warmup_steps": 10, "foreach": None})
    assert kwargs == {"lr": 1.0, "weight_decay": 0.0, "warmup_steps": 10}
    assert isinstance(kwargs["lr"], float) and isinstance(kwargs["warmup_steps"], int)
    assert isinstance(_factory_kwargs(ft.muon, {"ns_steps": 5})["ns_steps"], int)
