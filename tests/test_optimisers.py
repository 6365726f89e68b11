"""The common battery (DESIGN.md rule 7), run for every optimiser in the registry."""

from __future__ import annotations

import inspect
import io
import re

import pytest
import torch

import functrain as ft
from functrain import _tree

from .harness import gradient, make_params, relative_error, run_functrain, run_reference
from .registry import BEYOND_TORCH, BY_NAME, SPECS, TORCH_OPTIM_MIRRORS

STEPS = 25
CASES = [pytest.param(spec, kwargs, id=f"{spec.name}-{i}") for spec in SPECS for i, kwargs in enumerate(spec.cases())]
EACH = [pytest.param(spec, id=spec.name) for spec in SPECS]


def first_case(spec):
    return spec.cases()[0]


# ----------------------------------------------------------------------------- the registry itself


def test_registry_covers_every_optimiser():
    assert sorted(BY_NAME) == sorted(TORCH_OPTIM_MIRRORS + BEYOND_TORCH)
    for name, spec in BY_NAME.items():
        assert (spec.wraps or spec.make) is getattr(ft, name)


@pytest.mark.parametrize("name", TORCH_OPTIM_MIRRORS)
def test_signature_mirrors_torch_optim(name):
    """Same keyword names, order and defaults as torch.optim (minus implementation switches)."""
    torch_cls = BY_NAME[name].reference
    skip = {"self", "params", "foreach", "fused", "capturable", "differentiable"}
    theirs = [
        (p.name, p.default) for p in inspect.signature(torch_cls.__init__).parameters.values() if p.name not in skip
    ]
    ours = [(p.name, p.default) for p in inspect.signature(BY_NAME[name].make).parameters.values()]
    assert ours == theirs


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("spec,kwargs", CASES)
def test_parity_float64(spec, kwargs):
    params = make_params(matrices_only=spec.matrices_only)
    ours = run_functrain(spec.make(**kwargs), params, STEPS)
    expected = run_reference(spec.reference, kwargs, params, STEPS)
    assert relative_error(ours, expected) <= 1e-7


@pytest.mark.parametrize("spec,kwargs", CASES)
def test_parity_float32(spec, kwargs):
    params = make_params(torch.float32, matrices_only=spec.matrices_only)
    ours = run_functrain(spec.make(**kwargs), params, STEPS)
    expected = run_reference(spec.reference, kwargs, params, STEPS)
    assert relative_error(ours, expected) <= spec.float32_rtol


@pytest.mark.parametrize("spec", EACH)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multi_tensor_path_equals_per_leaf_reference(spec, dtype, monkeypatch):
    params = make_params(dtype, matrices_only=spec.matrices_only)
    for kwargs in spec.cases()[:4]:
        fast = run_functrain(spec.make(**kwargs), params, STEPS)
        with monkeypatch.context() as m:
            m.setattr(_tree, "fast_path_ok", lambda leaves: False)
            reference = run_functrain(spec.make(**kwargs), params, STEPS)
        assert relative_error(fast, reference) <= (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("spec", EACH)
def test_tensor_hyperparameters_equal_floats(spec):
    kwargs = first_case(spec)
    as_tensors = {k: _to_tensor(v) for k, v in kwargs.items()}
    params = make_params(matrices_only=spec.matrices_only)
    assert (
        relative_error(
            run_functrain(spec.make(**as_tensors), params, STEPS), run_functrain(spec.make(**kwargs), params, STEPS)
        )
        <= 1e-12
    )


def _to_tensor(value):
    if isinstance(value, tuple):
        return tuple(_to_tensor(v) for v in value)
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float64)
    return value


@pytest.mark.parametrize("spec", EACH)
def test_lr_schedule_equals_reference_with_lr_set_each_step(spec):
    """A schedule for ``lr`` equals torch.optim with the group's lr set before every step."""
    kwargs = first_case(spec)
    base_lr = kwargs.get("lr", inspect.signature(spec.make).parameters["lr"].default)
    lr_at = lambda t: base_lr * 0.9**t  # noqa: E731
    schedule = lambda count: base_lr * 0.9 ** count.to(torch.float64)  # noqa: E731
    params = make_params(matrices_only=spec.matrices_only)
    ours = run_functrain(spec.make(**{**kwargs, "lr": schedule}), params, STEPS)
    expected = run_reference(spec.reference, kwargs, params, STEPS, lr_at=lr_at)
    assert relative_error(ours, expected) <= 1e-7


# ----------------------------------------------------------------------------- behaviour


def quadratic(p):
    target = torch.linspace(-1, 1, p.numel(), dtype=p.dtype).reshape(p.shape)
    curvature = torch.linspace(0.5, 2.0, p.numel(), dtype=p.dtype).reshape(p.shape)
    return 0.5 * (curvature * (p - target) ** 2).sum()


def rosenbrock(p):
    x, y = p.reshape(-1)[0], p.reshape(-1)[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def minimise(tx, loss, p0, steps):
    params = {"p": p0}
    state = tx.init(params)
    grad = torch.func.grad(lambda ps: loss(ps["p"]))
    for _ in range(steps):
        updates, state = tx.update(grad(params), state, params)
        params = ft.apply_updates(params, updates)
    return loss(params["p"]).item()


@pytest.mark.parametrize("spec", EACH)
def test_converges_on_a_quadratic(spec):
    p0 = torch.zeros(4, 5, dtype=torch.float64) + 0.3
    start = quadratic(p0).item()
    assert minimise(spec.make(**spec.converge), quadratic, p0, 500) < 0.05 * start


@pytest.mark.parametrize("spec", EACH)
def test_converges_on_rosenbrock(spec):
    p0 = torch.tensor([[-1.5, 2.0]], dtype=torch.float64)
    start = rosenbrock(p0).item()
    kwargs = spec.converge if spec.converge_rosenbrock is None else spec.converge_rosenbrock
    assert minimise(spec.make(**kwargs), rosenbrock, p0, 3000) < 0.05 * start


def _run_steps(tx, params, steps, state=None):
    state = tx.init(params) if state is None else state
    for t in range(steps):
        updates, state = tx.update(gradient(params, t), state, params)
        params = ft.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("spec", EACH)
def test_state_structure_shapes_and_dtypes_are_stable(spec):
    tx = spec.make(**first_case(spec))
    params = make_params(torch.float32, matrices_only=spec.matrices_only)
    initial = tx.init(params)
    _, later = _run_steps(tx, params, 3)
    assert _tree.structure(initial) == _tree.structure(later)
    for a, b in zip(_tree.leaves(initial), _tree.leaves(later)):
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)


@pytest.mark.parametrize("spec", EACH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_params_and_state_keep_their_dtype(spec, dtype):
    tx = spec.make(**first_case(spec))
    params = make_params(dtype, matrices_only=spec.matrices_only)
    new_params, state = _run_steps(tx, params, 3)
    assert all(p.dtype == dtype for p in new_params.values())
    param_shapes = {p.shape for p in params.values()}
    for leaf in _tree.leaves(state):
        if leaf.is_floating_point() and leaf.shape in param_shapes and leaf.dim() > 0:
            assert leaf.dtype == dtype


@pytest.mark.parametrize("spec", EACH)
def test_empty_tree(spec):
    tx = spec.make(**first_case(spec))
    state = tx.init({})
    updates, state = tx.update({}, state, {})
    assert updates == {}
    assert ft.apply_updates({}, updates) == {}


@pytest.mark.parametrize("spec", EACH)
def test_nested_tree_equals_flat_tree(spec):
    flat = make_params(matrices_only=spec.matrices_only)
    keys = list(flat)
    nest = lambda d: {"a": {"b": d[keys[0]]}, "c": [d[k] for k in keys[1:]]}  # noqa: E731
    unnest = lambda n: {keys[0]: n["a"]["b"], **dict(zip(keys[1:], n["c"]))}  # noqa: E731
    tx = spec.make(**first_case(spec))
    expected, _ = _run_steps(tx, flat, 5)
    params, state = nest(flat), tx.init(nest(flat))
    for t in range(5):
        updates, state = tx.update(nest(gradient(unnest(params), t)), state, params)
        params = ft.apply_updates(params, updates)
    assert relative_error(unnest(params), expected) == 0.0


@pytest.mark.parametrize("spec", EACH)
def test_checkpoint_round_trip_with_weights_only(spec):
    tx = spec.make(**first_case(spec))
    params = make_params(matrices_only=spec.matrices_only)
    params, state = _run_steps(tx, params, 3)
    buffer = io.BytesIO()
    torch.save({"params": params, "opt_state": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert _tree.structure(loaded["opt_state"]) == _tree.structure(state)
    resumed, _ = _run_steps(tx, loaded["params"], 3, loaded["opt_state"])
    uninterrupted, _ = _run_steps(tx, params, 3, state)
    assert relative_error(resumed, uninterrupted) == 0.0


@pytest.mark.parametrize("spec", EACH)
def test_bad_hyperparameters_name_the_argument(spec):
    assert spec.bad, "every optimiser lists at least one invalid hyperparameter"
    for kwargs, argument in spec.bad:
        with pytest.raises(ValueError, match=re.escape(argument)):
            spec.make(**{**spec.base, **kwargs})


@pytest.mark.parametrize("spec", EACH)
def test_grads_with_another_tree_name_the_first_differing_key(spec):
    tx = spec.make(**first_case(spec))
    params = make_params(matrices_only=spec.matrices_only)
    state = tx.init(params)
    grads = gradient(params, 0)
    first = next(iter(grads))
    grads["renamed"] = grads.pop(first)
    with pytest.raises(ValueError, match=re.escape(f"['{first}']") + "|" + re.escape("['renamed']")):
        updates, state = tx.update(grads, state, params)
        ft.apply_updates(params, updates)


# ----------------------------------------------------------------------------- compiled


@pytest.mark.slow
@pytest.mark.parametrize("spec", EACH)
def test_compiled_update_equals_eager_and_never_recompiles(spec):
    torch._dynamo.reset()
    tx = spec.make(**first_case(spec))
    params = make_params(torch.float32, matrices_only=spec.matrices_only)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return ft.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True)
    eager_params, eager_state = params, tx.init(params)
    params, state = params, tx.init(params)
    for t in range(2):
        params, state = compiled(params, state, gradient(params, t))
        eager_params, eager_state = step(eager_params, eager_state, gradient(eager_params, t))
    with torch.compiler.set_stance("fail_on_recompile"):
        for t in range(2, 5):
            params, state = compiled(params, state, gradient(params, t))
            eager_params, eager_state = step(eager_params, eager_state, gradient(eager_params, t))
    assert relative_error(params, eager_params) <= spec.float32_rtol
