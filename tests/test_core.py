"""base, _tree, chain, inject_hyperparams and schedulable."""

from __future__ import annotations

import inspect
import io

import pytest
import torch

import functrain as ft
from functrain import _tree
from functrain.wrappers import InjectHyperparamsState

from .harness import gradient, make_params, relative_error, run_functrain


def test_apply_updates_is_pure_and_keeps_param_dtype():
    params = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.zeros(2)}
    before = {k: v.clone() for k, v in params.items()}
    updates = {"a": torch.full((3,), 0.5), "b": torch.full((2,), -1.0)}
    new = ft.apply_updates(params, updates)
    assert new["a"].dtype == torch.bfloat16 and torch.equal(new["a"], torch.full((3,), 1.5, dtype=torch.bfloat16))
    assert torch.equal(new["b"], torch.full((2,), -1.0))
    assert all(torch.equal(params[k], before[k]) for k in params)


@pytest.mark.parametrize("fast", [True, False])
def test_apply_updates_names_the_first_differing_key(fast, monkeypatch):
    monkeypatch.setattr(_tree, "fast_path_ok", lambda leaves: fast)
    with pytest.raises(ValueError, match=r"\['bias'\]"):
        ft.apply_updates(
            {"weight": torch.ones(2), "bias": torch.ones(1)}, {"weight": torch.ones(2), "bais": torch.ones(1)}
        )


def test_tree_mismatch_reports_missing_key():
    with pytest.raises(_tree.TreeMismatchError, match=r"\['c'\].*only in the first"):
        _tree.map(torch.add, {"a": torch.ones(1), "c": torch.ones(1)}, {"a": torch.ones(1)})


def test_identity_returns_updates_and_holds_nothing():
    tx = ft.identity()
    state = tx.init({"a": torch.ones(2)})
    updates, new_state = tx.update({"a": torch.ones(2)}, state)
    assert new_state == ft.EmptyState() and torch.equal(updates["a"], torch.ones(2))


def test_chain_composes_in_order():
    tx = ft.chain(ft.transforms.scale(2.0), ft.transforms.add_decayed_weights(1.0), ft.transforms.scale(-1.0))
    params = {"w": torch.tensor([1.0, 2.0])}
    updates, _ = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
    assert torch.equal(updates["w"], -(2 * torch.tensor([3.0, 4.0]) + params["w"]))


def test_chain_rejects_non_transforms():
    with pytest.raises(TypeError, match="argument 1"):
        ft.chain(ft.identity(), lambda g: g)


def test_adamw_is_a_chain_of_named_transforms():
    """AdamW written out by hand from transforms is the same optimiser."""
    by_hand = ft.chain(
        ft.transforms.scale_by_adam(0.9, 0.999, 1e-8),
        ft.transforms.add_decayed_weights(0.1),
        ft.transforms.scale_by_learning_rate(0.01),
    )
    params = make_params()
    assert (
        relative_error(
            run_functrain(by_hand, params, 20), run_functrain(ft.adamw(lr=0.01, weight_decay=0.1), params, 20)
        )
        <= 1e-15
    )


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("lr", [0.01, torch.tensor(0.01, dtype=torch.float64)])
def test_descend_with_decoupled_decay_equals_decay_then_learning_rate(fast, lr, monkeypatch):
    original = _tree.fast_path_ok
    monkeypatch.setattr(_tree, "fast_path_ok", lambda leaves: fast and original(leaves))
    params, updates = make_params(torch.float32), gradient(make_params(torch.float32), 0)
    fused = ft.transforms.descend_with_decoupled_decay(lr, 0.1)
    two_steps = ft.chain(ft.transforms.add_decayed_weights(0.1), ft.transforms.scale_by_learning_rate(lr))
    out, _ = fused.update(updates, fused.init(params), params)
    expected, _ = two_steps.update(updates, two_steps.init(params), params)
    assert relative_error(out, expected) <= 1e-7
    assert all(out[k].dtype == torch.float32 for k in out)


def test_trace_first_step_ignores_dampening_like_torch():
    tx = ft.transforms.trace(0.9, dampening=0.5)
    params = {"w": torch.zeros(2)}
    state = tx.init(params)
    out, state = tx.update({"w": torch.tensor([1.0, 2.0])}, state)
    assert torch.equal(out["w"], torch.tensor([1.0, 2.0]))
    out, state = tx.update({"w": torch.tensor([1.0, 2.0])}, state)
    assert torch.allclose(out["w"], 0.9 * torch.tensor([1.0, 2.0]) + 0.5 * torch.tensor([1.0, 2.0]))


# ----------------------------------------------------------------------------- inject_hyperparams


def test_inject_hyperparams_holds_0d_tensors_and_keeps_the_trajectory():
    params = make_params()
    injected = ft.inject_hyperparams(ft.adamw)(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    state = injected.init(params)
    assert isinstance(state, InjectHyperparamsState)
    assert state.hyperparams["lr"].shape == () and state.hyperparams["lr"].dtype == torch.float64
    assert isinstance(state.hyperparams["betas"], tuple) and float(state.hyperparams["betas"][1]) == 0.99
    plain = ft.adamw(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    assert relative_error(run_functrain(injected, params, 30), run_functrain(plain, params, 30)) <= 1e-15


def test_changing_an_injected_hyperparameter_changes_the_next_step():
    params = {"w": torch.ones(3)}
    tx = ft.inject_hyperparams(ft.sgd)(lr=0.1)
    state = tx.init(params)
    updates, state = tx.update({"w": torch.ones(3)}, state, params)
    assert torch.allclose(updates["w"], torch.full((3,), -0.1))
    state = state._replace(hyperparams={**state.hyperparams, "lr": torch.tensor(0.5, dtype=torch.float64)})
    updates, state = tx.update({"w": torch.ones(3)}, state, params)
    assert torch.allclose(updates["w"], torch.full((3,), -0.5))


def test_static_arguments_are_not_injected():
    tx = ft.inject_hyperparams(ft.sgd)(lr=0.1, momentum=0.9, nesterov=True)
    state = tx.init({"w": torch.ones(2)})
    assert set(state.hyperparams) == {"lr", "momentum"}


def test_inject_hyperparams_validates_initial_values():
    with pytest.raises(ValueError, match="lr"):
        ft.inject_hyperparams(ft.adam)(lr=-1.0)


def test_a_schedule_makes_an_injected_state_that_advances():
    tx = ft.sgd(lr=lambda count: 0.1 * (count + 1).to(torch.float64))
    params = {"w": torch.zeros(1)}
    state = tx.init(params)
    steps = []
    for _ in range(3):
        updates, state = tx.update({"w": torch.ones(1)}, state, params)
        steps.append(updates["w"].item())
    assert steps == pytest.approx([-0.1, -0.2, -0.3])
    assert int(state.count) == 3 and isinstance(state, ft.ScheduleState)  # schedules are not stored


def test_injected_state_round_trips_weights_only():
    tx = ft.inject_hyperparams(ft.adam)(lr=0.01)
    params = make_params()
    state = tx.init(params)
    _, state = tx.update(gradient(params, 0), state, params)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert isinstance(loaded, InjectHyperparamsState) and torch.equal(loaded.count, state.count)


@pytest.mark.slow
def test_changing_injected_lr_never_recompiles():
    torch._dynamo.reset()
    tx = ft.inject_hyperparams(ft.adamw)(lr=1e-2, weight_decay=1e-2)
    params = make_params(torch.float32)

    @torch.compile(fullgraph=True)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return ft.apply_updates(params, updates), state

    state = tx.init(params)
    params, state = step(params, state, gradient(params, 0))
    moved = []
    with torch.compiler.set_stance("fail_on_recompile"):
        for t, lr in enumerate([1e-3, 5e-4, 0.0]):
            state = state._replace(hyperparams={**state.hyperparams, "lr": torch.tensor(lr, dtype=torch.float64)})
            before = params
            params, state = step(params, state, gradient(params, t + 1))
            moved.append(any(not torch.equal(before[k], params[k]) for k in params))
    assert moved == [True, True, False]  # the new lr took effect: lr=0 leaves the params where they were


def _every_registry_case():
    from .registry import SPECS

    return [
        pytest.param(spec, kwargs, id=f"{spec.name}-{i}") for spec in SPECS for i, kwargs in enumerate(spec.cases())
    ]


@pytest.mark.parametrize("spec,kwargs", _every_registry_case())
def test_injecting_every_hyperparameter_keeps_every_optimisers_trajectory(spec, kwargs):
    """With the defaults injected too, each optimiser (every registry option) takes the plain one's steps."""
    # Tensor ns_coefficients leave torch.addmm for a float32 sum (bf16 ulps apart; see transforms/_muon.py).
    static = ("ns_coefficients",) if spec.name == "muon" else ()
    injected = ft.inject_hyperparams(spec.make, static_args=static)(**kwargs)
    params = make_params(matrices_only=spec.matrices_only)
    state = injected.init(params)
    numeric = [
        p.name for p in inspect.signature(spec.make).parameters.values() if isinstance(p.default, (float, tuple))
    ]
    expected = {n for n in numeric if n not in static and (n in kwargs or _default(spec.make, n) != 0.0)}
    assert set(state.hyperparams) == expected
    assert relative_error(run_functrain(injected, params, 10), run_functrain(spec.make(**kwargs), params, 10)) <= 1e-15


def _default(factory, name):
    return inspect.signature(factory).parameters[name].default


def test_int_values_for_float_hyperparameters_are_injected_as_float64():
    tx = ft.inject_hyperparams(ft.adamw)(lr=1, weight_decay=0)
    state = tx.init({"w": torch.ones(2)})
    assert set(state.hyperparams) == {"lr", "betas", "eps", "weight_decay"}
    assert state.hyperparams["lr"].dtype == torch.float64 and float(state.hyperparams["lr"]) == 1.0
    assert float(state.hyperparams["weight_decay"]) == 0.0
    # A genuinely integer argument stays static.
    muon = ft.inject_hyperparams(ft.muon, static_args=("ns_coefficients",))(lr=0.1, ns_steps=3)
    assert "ns_steps" not in muon.init({"w": torch.ones(2, 2)}).hyperparams


def test_zero_defaults_stay_static_so_the_structure_is_the_plain_ones():
    """sgd's momentum=0 default builds no momentum buffer; given explicitly, it is injected (and one is kept)."""
    params = {"w": torch.ones(2)}
    default = ft.inject_hyperparams(ft.sgd)(lr=0.1).init(params)
    assert set(default.hyperparams) == {"lr"}
    assert _tree.structure(default.inner_state) == _tree.structure(ft.sgd(lr=0.1).init(params))
    explicit = ft.inject_hyperparams(ft.sgd)(lr=0.1, momentum=0.0).init(params)
    assert set(explicit.hyperparams) == {"lr", "momentum"}


def test_a_transformation_argument_is_static_and_varargs_pass_through():
    params = make_params()
    tx = ft.inject_hyperparams(ft.lookahead)(ft.sgd(lr=0.1), sync_period=2, alpha=0.5)
    assert set(tx.init(params).hyperparams) == {"alpha"}
    plain = ft.lookahead(ft.sgd(lr=0.1), sync_period=2, alpha=0.5)
    assert relative_error(run_functrain(tx, params, 5), run_functrain(plain, params, 5)) == 0
    params = {"w": torch.zeros(1)}
    chained = ft.inject_hyperparams(ft.chain)(ft.transforms.scale(2.0), ft.transforms.scale(3.0))
    updates, _ = chained.update({"w": torch.ones(1)}, chained.init(params))
    assert torch.equal(updates["w"], torch.full((1,), 6.0))


def test_unknown_arguments_and_non_factories_name_the_factory():
    with pytest.raises(
        TypeError, match=r"inject_hyperparams\(adam\): unexpected argument 'bogus'; adam takes lr, betas"
    ):
        ft.inject_hyperparams(ft.adam)(bogus=1)
    with pytest.raises(TypeError, match=r"inject_hyperparams\(sgd\): .*sgd takes lr"):
        ft.inject_hyperparams(ft.sgd)(0.1, 0.9, 0.0, 0.0, False, False, 3)
    with pytest.raises(TypeError, match="factory must be a function"):
        ft.inject_hyperparams(ft.adam(lr=0.1))


def test_a_schedule_is_validated_at_count_zero():
    with pytest.raises(ValueError, match="lr"):
        ft.inject_hyperparams(ft.adam)(lr=lambda count: count * 0.0 - 1.0)


def test_set_hyperparams_replaces_values_inside_a_nested_state():
    params = {"w": torch.ones(3)}
    tx = ft.chain(ft.clip_by_global_norm(10.0), ft.inject_hyperparams(ft.adam)(lr=0.1))
    state = tx.init(params)
    new = ft.set_hyperparams(state, lr=1, betas=(0.5, torch.tensor(0.9, dtype=torch.float64)))
    injected = new[1]
    assert injected.hyperparams["lr"].dtype == torch.float64 and injected.hyperparams["lr"].shape == ()
    assert [float(b) for b in injected.hyperparams["betas"]] == [0.5, 0.9]
    assert float(state[1].hyperparams["lr"]) == 0.1  # the input is left as it was
    assert new[0] is state[0] and new[1].inner_state is state[1].inner_state  # the rest is shared
    updates, _ = tx.update({"w": torch.ones(3)}, new, params)
    expected, _ = ft.adam(lr=1.0, betas=(0.5, 0.9)).update({"w": torch.ones(3)}, state[1].inner_state, params)
    assert torch.equal(updates["w"], expected["w"])
    with pytest.raises(ValueError, match=r"'lrr'.*\['betas', 'eps', 'lr'\]"):
        ft.set_hyperparams(state, lrr=0.1)
    with pytest.raises(ValueError, match="exactly one InjectHyperparamsState"):
        ft.set_hyperparams(ft.adam(lr=0.1).init(params), lr=0.1)
    with pytest.raises(TypeError, match="schedule"):
        ft.set_hyperparams(state, lr=lambda count: 0.1)


def test_eager_updates_reuse_the_inner_transformation_until_a_value_is_replaced(monkeypatch):
    """The factory runs at build, at init, and again only when the state's hyperparameter tensors change."""
    calls = []

    def factory(lr: float = 0.1):
        calls.append(lr)
        return ft.transforms.scale(-lr)

    tx = ft.inject_hyperparams(factory)()
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update({"w": torch.ones(2)}, state, params)

    # The build-time check, then init; the updates reuse init's transform. (Once, the first update's
    # input check also runs init on meta tensors: the state's expected structure, no memory.)
    def real_calls():
        return [lr for lr in calls if not (isinstance(lr, torch.Tensor) and lr.device.type == "meta")]

    assert len(real_calls()) == 2
    state = ft.set_hyperparams(state, lr=0.5)
    for _ in range(2):
        updates, state = tx.update({"w": torch.ones(2)}, state, params)
    assert len(real_calls()) == 3 and torch.equal(updates["w"], torch.full((2,), -0.5))
    scheduled = ft.inject_hyperparams(factory)(lr=lambda count: 0.1 * (count + 1).to(torch.float64))
    state = scheduled.init(params)
    steps = []
    for _ in range(3):
        updates, state = scheduled.update({"w": torch.ones(2)}, state, params)
        steps.append(float(updates["w"][0]))
    assert steps == pytest.approx([-0.1, -0.2, -0.3])


def test_schedulable_only_schedules_numeric_hyperparameters():
    """A mask function is not a schedule: add_decayed_weights(mask=fn) stays a plain transform."""
    decay = ft.transforms.add_decayed_weights(0.1, mask=lambda name, p: p.ndim >= 2)
    assert not isinstance(decay.init({"w": torch.ones(2, 2)}), InjectHyperparamsState)
    is_hp = ft.wrappers._inject.is_hyperparameter
    signature_of = ft.wrappers.signature_of  # annotations evaluated, as inject_hyperparams reads them
    params = signature_of(ft.muon).parameters
    assert is_hp(params["lr"], 1) and is_hp(params["lr"], lambda c: c) and not is_hp(params["ns_steps"], 5)
    assert not is_hp(signature_of(ft.clip_by_global_norm).parameters["norm_type"], 2.0)
    assert not is_hp(signature_of(ft.lookahead).parameters["tx"], ft.sgd(lr=0.1))


@pytest.mark.slow
def test_set_hyperparams_between_compiled_updates_never_recompiles():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    tx = ft.inject_hyperparams(ft.sgd)(lr=0.1)
    params = {"w": torch.ones(3)}
    update = torch.compile(tx.update, backend=counter, fullgraph=True)
    state = tx.init(params)
    updates, state = update({"w": torch.ones(3)}, state, params)
    with torch.compiler.set_stance("fail_on_recompile"):
        for lr in [1e-4, 2, 0.5]:
            state = ft.set_hyperparams(state, lr=lr)
            updates, state = update({"w": torch.ones(3)}, state, params)
            assert torch.allclose(updates["w"], torch.full((3,), -float(lr)))
    assert counter.frame_count == 1


def test_an_unbounded_check_names_nan_instead_of_failing_to_format():
    from functrain import _validate

    with pytest.raises(ValueError, match=r"owner: x must be a number \(not NaN\), got nan"):
        _validate.in_range("owner", "x", float("nan"))


# ----------------------------------------------------------------------------- tree maths on plain dicts


def _pytree_map(fn, tree, *rest):
    import torch.utils._pytree as pytree

    return pytree.tree_map(fn, tree, *rest)


@pytest.mark.parametrize(
    "trees",
    [
        [{"b": torch.ones(2), "a": torch.zeros(3)}, {"b": torch.full((2,), 2.0), "a": torch.ones(3)}],  # a flat dict
        [{"w": torch.ones(2), "inner": {"v": torch.ones(1)}}, {"w": torch.ones(2), "inner": {"v": torch.ones(1)}}],
        [{"w": torch.ones(2), "skip": None}, {"w": torch.ones(2), "skip": None}],  # None: no leaf to pytree
        [{"w": torch.ones(2), "n": 3.0}, {"w": torch.ones(2), "n": 4.0}],  # a float leaf
    ],
    ids=["flat", "nested", "none", "float"],
)
def test_tree_maths_on_dicts_give_pytrees_walk(trees):
    """Plain dicts of tensors are mapped without pytree's specs (dynamo traces those op by op); the results,
    leaves and names are pytree's, for those dicts and for the dicts that take the general walk."""
    import torch.utils._pytree as pytree

    def fn(x, y):
        return x + y if isinstance(x, torch.Tensor) else (x, y)

    mapped = _tree.map(fn, *trees)
    expected = _pytree_map(fn, *trees)
    assert pytree.tree_structure(mapped) == pytree.tree_structure(expected) and list(mapped) == list(expected)
    for x, y in zip(pytree.tree_leaves(mapped), pytree.tree_leaves(expected)):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    pairs = _tree.map_many(lambda x, y: (x, y), *trees, n=2)
    assert [pytree.tree_structure(p) for p in pairs] == [pytree.tree_structure(trees[0])] * 2
    assert [id(x) for x in _tree.leaves(trees[0])] == [id(x) for x in pytree.tree_leaves(trees[0])]
    names = [name for name, _ in _tree.named_leaves(trees[0])]
    paths = [".".join(str(k.key) for k in path) for path, _ in pytree.tree_flatten_with_path(trees[0])[0]]
    assert names == paths


def test_dicts_with_the_same_keys_in_another_order_are_refused_by_key():
    a = {"w": torch.ones(2), "b": torch.ones(1)}
    with pytest.raises(_tree.TreeMismatchError, match="first differing key"):
        _tree.map(torch.add, a, {"b": torch.ones(1), "w": torch.ones(2)})
    with pytest.raises(_tree.TreeMismatchError, match="first differing key"):
        _tree.map_many(lambda x, y: (x, y), a, {"w": torch.ones(2)}, n=2)
