"""base, _tree, chain, inject_hyperparams and schedulable."""

from __future__ import annotations

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
    assert int(state.count) == 3 and float(state.hyperparams["lr"]) == pytest.approx(0.3)


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
