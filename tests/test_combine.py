"""partition and set_to_zero."""

from __future__ import annotations

import io

import pytest
import torch

import functrain as ft
from functrain import _tree

from .harness import gradient, make_params, relative_error, run_functrain, run_reference


def by_ndim(name, tensor):
    return "matrix" if tensor.ndim >= 2 else "other"


def test_partition_equals_torch_param_groups():
    """Per-group learning rates and no decay on biases: torch.optim param groups, exactly."""
    params = make_params()
    tx = ft.partition(
        {"matrix": ft.adamw(lr=0.01, weight_decay=0.1), "other": ft.adamw(lr=0.03, weight_decay=0.0)}, by_ndim
    )
    ours = run_functrain(tx, params, 20)

    def grouped(tensors):
        names = list(params)
        matrices = [t for n, t in zip(names, tensors) if params[n].ndim >= 2]
        others = [t for n, t in zip(names, tensors) if params[n].ndim < 2]
        return torch.optim.AdamW(
            [{"params": matrices, "lr": 0.01, "weight_decay": 0.1}, {"params": others, "lr": 0.03, "weight_decay": 0.0}]
        )

    assert relative_error(ours, run_reference(grouped, {}, params, 20)) <= 1e-7


def test_labels_as_a_pytree_equal_labels_as_a_function():
    params = make_params()
    labels = {k: by_ndim(k, v) for k, v in params.items()}
    transforms = {"matrix": ft.sgd(lr=0.1, momentum=0.9), "other": ft.adam(lr=0.01)}
    assert (
        relative_error(
            run_functrain(ft.partition(transforms, labels), params, 10),
            run_functrain(ft.partition(transforms, by_ndim), params, 10),
        )
        == 0.0
    )


def test_frozen_group_holds_no_state_and_does_not_move():
    params = {"backbone.weight": torch.randn(8, 8), "backbone.bias": torch.randn(8), "head.weight": torch.randn(2, 8)}
    tx = ft.partition(
        {"train": ft.adam(lr=0.1), "frozen": ft.set_to_zero()},
        lambda name, _: "frozen" if name.startswith("backbone") else "train",
    )
    state = tx.init(params)
    assert state.inner_states["frozen"] == ft.EmptyState()
    state_elements = sum(leaf.numel() for leaf in _tree.leaves(state.inner_states["train"]))
    assert state_elements == 2 * params["head.weight"].numel() + 2  # mu, nu, adam's and the schedule's counts
    new = run_functrain(tx, params, 5)
    assert torch.equal(new["backbone.weight"], params["backbone.weight"])
    assert not torch.equal(new["head.weight"], params["head.weight"])


def test_partition_of_one_group_equals_the_transform_alone():
    params = make_params()
    assert (
        relative_error(
            run_functrain(ft.partition({"all": ft.adamw(lr=0.01)}, lambda n, p: "all"), params, 10),
            run_functrain(ft.adamw(lr=0.01), params, 10),
        )
        == 0.0
    )


def test_nested_params_are_named_with_dots():
    params = {"encoder": {"0": {"weight": torch.ones(2, 2)}}, "head": [torch.ones(2)]}
    seen = []
    tx = ft.partition({"a": ft.sgd(lr=0.1)}, lambda name, p: seen.append(name) or "a")
    tx.init(params)
    assert seen == ["encoder.0.weight", "head.0"]


def test_a_label_without_a_transform_is_named():
    with pytest.raises(ValueError, match=r"'bias'.*no transform.*first: parameter 'b'"):
        ft.partition({"weight": ft.sgd()}, lambda n, p: "weight" if p.ndim >= 2 else "bias").init(make_params())


def test_a_transform_without_labels_is_named():
    with pytest.raises(ValueError, match=r"\['unused'\] have no parameters"):
        ft.partition({"all": ft.sgd(), "unused": ft.adam()}, lambda n, p: "all").init(make_params())


def test_a_label_tree_of_another_structure_names_the_key():
    params = make_params()
    labels = {"w": "a", "b": "a", "t": "a"}
    with pytest.raises(ValueError, match=r"\['s'\]"):
        ft.partition({"a": ft.sgd()}, labels).init(params)


@pytest.mark.slow
def test_partition_with_a_frozen_group_compiles_in_one_graph():
    torch._dynamo.reset()
    tx = ft.partition(
        {"train": ft.adamw(lr=0.01), "frozen": ft.set_to_zero()}, lambda name, p: "frozen" if p.ndim < 2 else "train"
    )
    params = make_params(torch.float32)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return ft.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True)
    state = tx.init(params)
    eager = (params, tx.init(params))
    for t in range(3):
        params, state = compiled(params, state, gradient(params, t))
        eager = step(*eager, gradient(eager[0], t))
    assert relative_error(params, eager[0]) <= 1e-6


# ----------------------------------------------------------------------------- named_chain


def save_and_load(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_states_equal(a, b):
    _tree.check_same_structure(a, b)
    assert all(torch.equal(x, y) for x, y in zip(_tree.leaves(a), _tree.leaves(b)))


def test_named_chain_equals_chain():
    params = make_params()
    named = ft.named_chain(clip=ft.clip_by_global_norm(0.5), sgd=ft.sgd(lr=0.1, momentum=0.9))
    positional = ft.chain(ft.clip_by_global_norm(0.5), ft.sgd(lr=0.1, momentum=0.9))
    assert relative_error(run_functrain(named, params, 10), run_functrain(positional, params, 10)) == 0.0
    assert list(named.init(params)) == ["clip", "sgd"]


def test_named_chain_takes_pairs_in_their_order():
    params = make_params()
    pairs = ft.named_chain(("adam", ft.transforms.scale_by_adam()), ("lr", ft.transforms.scale_by_learning_rate(0.1)))
    keywords = ft.named_chain(adam=ft.transforms.scale_by_adam(), lr=ft.transforms.scale_by_learning_rate(0.1))
    assert list(pairs.init(params)) == ["adam", "lr"]
    assert relative_error(run_functrain(pairs, params, 5), run_functrain(keywords, params, 5)) == 0.0


def test_named_state_round_trips_a_checkpoint_and_resumes_exactly():
    params = make_params()
    tx = ft.named_chain(clip=ft.clip_by_global_norm(1.0), adam=ft.adam(lr=0.05))
    state = tx.init(params)
    for t in range(3):
        updates, state = tx.update(gradient(params, t), state, params)
        params = ft.apply_updates(params, updates)
    loaded = save_and_load(state)
    assert list(loaded) == ["clip", "adam"]
    assert_states_equal(loaded, state)
    resumed, continued = tx.update(gradient(params, 3), loaded, params), tx.update(gradient(params, 3), state, params)
    assert_states_equal(resumed, continued)


def test_a_saved_named_state_loads_into_a_reordered_chain_by_name():
    params = make_params()
    momentum, adam = ft.transforms.trace(0.9), ft.transforms.scale_by_adam()
    saved = ft.named_chain(momentum=momentum, adam=adam)
    state = saved.init(params)
    for t in range(3):
        _, state = saved.update(gradient(params, t), state, params)
    state = save_and_load(state)

    reordered = ft.named_chain(adam=adam, momentum=momentum)
    updates, new_state = reordered.update(gradient(params, 3), state, params)
    # By name, not position: adam runs first, on its own saved moments, then momentum on its trace.
    by_hand, adam_state = adam.update(gradient(params, 3), state["adam"], params)
    by_hand, momentum_state = momentum.update(by_hand, state["momentum"], params)
    assert list(new_state) == ["adam", "momentum"]
    assert_states_equal(updates, by_hand)
    assert_states_equal(new_state, {"adam": adam_state, "momentum": momentum_state})


def test_a_renamed_or_missing_state_entry_is_named():
    params = make_params()
    tx = ft.named_chain(clip=ft.clip(1.0), adam=ft.adam())
    state = tx.init(params)
    renamed = {"clipping": state["clip"], "adam": state["adam"]}
    with pytest.raises(ValueError, match=r"missing \['clip'\], unexpected \['clipping'\]"):
        tx.update(gradient(params, 0), renamed, params)
    with pytest.raises(ValueError, match=r"missing \['adam'\], unexpected \[\]"):
        tx.update(gradient(params, 0), {"clip": state["clip"]}, params)
    with pytest.raises(ValueError, match=r"missing \['clip', 'adam'\]"):
        tx.update(gradient(params, 0), tuple(state.values()), params)  # a chain's state


def test_named_chain_arguments_are_checked():
    with pytest.raises(TypeError, match=r"positional argument 0 must be a \(name, transform\) pair"):
        ft.named_chain(ft.adam())
    with pytest.raises(ValueError, match=r"the name 'a' is given twice"):
        ft.named_chain(("a", ft.adam()), a=ft.sgd())
    with pytest.raises(TypeError, match=r"'a' must be a GradientTransformation"):
        ft.named_chain(a=0.1)


# ----------------------------------------------------------------------------- masked and freeze


def is_matrix(name, tensor):
    return tensor.ndim >= 2


def state_elements(state):
    return sum(leaf.numel() for leaf in _tree.leaves(state))


def test_masked_applies_the_transform_to_the_selected_leaves_only():
    params = make_params()
    tx = ft.masked(ft.adam(lr=0.1), is_matrix)
    selected = {k: v for k, v in params.items() if v.ndim >= 2}
    alone = ft.adam(lr=0.1)
    state, alone_state = tx.init(params), alone.init(selected)
    assert state_elements(state) == state_elements(alone_state) == 2 * sum(v.numel() for v in selected.values()) + 2
    for t in range(5):
        grads = gradient(params, t)
        updates, state = tx.update(grads, state, params)
        expected, alone_state = alone.update({k: grads[k] for k in selected}, alone_state, selected)
        for k in params:
            if k in selected:
                assert torch.equal(updates[k], expected[k])
            else:
                assert updates[k] is grads[k]  # passed through, untouched
    assert_states_equal(state.inner_state, alone_state)


def test_a_mask_tree_equals_a_mask_function():
    params = make_params()
    mask = {k: is_matrix(k, v) for k, v in params.items()}
    assert (
        relative_error(
            run_functrain(ft.masked(ft.sgd(lr=0.1, momentum=0.9), mask), params, 5),
            run_functrain(ft.masked(ft.sgd(lr=0.1, momentum=0.9), is_matrix), params, 5),
        )
        == 0.0
    )


def test_a_mask_tree_of_another_structure_names_the_key():
    params = make_params()
    mask = {"w": True, "b": False, "t": True, "x": False}
    with pytest.raises(_tree.TreeMismatchError, match=r"masked: params and mask.*first differing key: \['s'\]"):
        ft.masked(ft.adam(), mask).init(params)
    with pytest.raises(_tree.TreeMismatchError, match=r"\['s'\]"):
        ft.freeze(mask).update(gradient(params, 0), ft.freeze(is_matrix).init(params), params)


def test_a_mask_that_is_not_bool_is_a_type_error():
    with pytest.raises(TypeError, match=r"masked: the mask must give a bool for each leaf, got 'yes' for 'w'"):
        ft.masked(ft.adam(), lambda n, p: "yes").init(make_params())


def test_frozen_params_do_not_move_hold_no_state_and_the_rest_pass_through():
    params = make_params()
    tx = ft.freeze(lambda name, p: name in ("w", "s"))
    state = tx.init(params)
    assert state_elements(state) == 0
    grads = gradient(params, 0)
    updates, _ = tx.update(grads, state, params)
    assert torch.equal(updates["w"], torch.zeros_like(params["w"])) and torch.equal(updates["s"], torch.zeros(()))
    assert updates["b"] is grads["b"] and updates["t"] is grads["t"]
    new = run_functrain(ft.chain(ft.adam(lr=0.1), tx), params, 5)
    assert torch.equal(new["w"], params["w"]) and torch.equal(new["s"], params["s"])
    assert not torch.equal(new["b"], params["b"])


def test_freezing_with_no_optimiser_state_for_the_frozen_leaves():
    """The two spellings that hold no state for frozen leaves agree; freezing after (or before) the
    optimiser in a chain keeps full state, as the docstring says."""
    params = make_params()

    def frozen(name, p):
        return p.ndim < 2

    def trainable(name, p):
        return not frozen(name, p)

    masked_spelling = ft.chain(ft.masked(ft.adamw(lr=0.1), trainable), ft.freeze(frozen))
    partition_spelling = ft.partition(
        {"train": ft.adamw(lr=0.1), "frozen": ft.set_to_zero()}, lambda n, p: "frozen" if frozen(n, p) else "train"
    )
    trained_numel = sum(v.numel() for v in params.values() if v.ndim >= 2)
    assert state_elements(masked_spelling.init(params)) == 2 * trained_numel + 2  # mu, nu, the two counts
    assert state_elements(partition_spelling.init(params)) == 2 * trained_numel + 2
    a, b = run_functrain(masked_spelling, params, 5), run_functrain(partition_spelling, params, 5)
    assert relative_error(a, b) == 0.0
    assert all(torch.equal(a[k], params[k]) for k in params if params[k].ndim < 2)

    all_numel = sum(v.numel() for v in params.values())
    for full_state in (ft.chain(ft.adamw(lr=0.1), ft.freeze(frozen)), ft.chain(ft.freeze(frozen), ft.adamw(lr=0.1))):
        assert state_elements(full_state.init(params)) == 2 * all_numel + 2
    # Freezing before AdamW: the zeroed gradients leave Adam's moments at zero, but decoupled weight decay
    # still shrinks the frozen params.
    decayed = run_functrain(ft.chain(ft.freeze(frozen), ft.adamw(lr=0.1, weight_decay=0.1)), params, 3)
    assert not torch.equal(decayed["b"], params["b"])


def test_masked_state_round_trips_a_checkpoint():
    params = make_params()
    tx = ft.named_chain(frozen=ft.freeze(lambda n, p: n == "b"), adam=ft.masked(ft.adam(), is_matrix))
    state = tx.init(params)
    _, state = tx.update(gradient(params, 0), state, params)
    assert_states_equal(save_and_load(state), state)


# ----------------------------------------------------------------------------- add_decayed_weights(mask=...)


def decays(name, tensor):
    return tensor.ndim >= 2  # no decay on biases, norms and scalars


def two_groups(params, optimiser, decay_kwargs, no_decay_kwargs):
    """A torch.optim factory for run_reference: param groups "decay" and "no decay", as users write them."""

    def build(tensors):
        names = list(params)
        decay = [t for n, t in zip(names, tensors) if decays(n, params[n])]
        rest = [t for n, t in zip(names, tensors) if not decays(n, params[n])]
        return optimiser([{"params": decay, **decay_kwargs}, {"params": rest, **no_decay_kwargs}])

    return build


@pytest.mark.parametrize("mask_as", ["function", "tree"])
def test_masked_decoupled_decay_equals_adamw_param_groups(mask_as):
    params = make_params()
    mask = decays if mask_as == "function" else {k: decays(k, v) for k, v in params.items()}
    tx = ft.chain(
        ft.transforms.scale_by_adam(),
        ft.transforms.add_decayed_weights(0.1, mask=mask),
        ft.transforms.scale_by_learning_rate(0.02),
    )
    reference = two_groups(
        params, torch.optim.AdamW, {"lr": 0.02, "weight_decay": 0.1}, {"lr": 0.02, "weight_decay": 0}
    )
    assert relative_error(run_functrain(tx, params, 20), run_reference(reference, {}, params, 20)) <= 1e-7


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_masked_l2_decay_equals_sgd_param_groups(momentum):
    params = make_params()
    tx = ft.chain(
        ft.transforms.add_decayed_weights(0.1, mask=decays),
        *([ft.transforms.trace(momentum)] if momentum else []),
        ft.transforms.scale_by_learning_rate(0.05),
    )
    reference = two_groups(
        params,
        torch.optim.SGD,
        {"lr": 0.05, "momentum": momentum, "weight_decay": 0.1},
        {"lr": 0.05, "momentum": momentum, "weight_decay": 0},
    )
    assert relative_error(run_functrain(tx, params, 20), run_reference(reference, {}, params, 20)) <= 1e-12


def test_masked_decay_leaves_the_unselected_updates_untouched_on_both_paths(monkeypatch):
    params = make_params()
    grads = gradient(params, 0)
    tx = ft.transforms.add_decayed_weights(0.1, mask=decays)
    foreach, _ = tx.update(grads, tx.init(params), params)
    monkeypatch.setattr(_tree, "fast_path_ok", lambda leaves: False)
    per_leaf, _ = tx.update(grads, tx.init(params), params)
    for k in params:
        if decays(k, params[k]):
            assert torch.equal(per_leaf[k], grads[k] + 0.1 * params[k])
            assert torch.allclose(foreach[k], per_leaf[k], rtol=1e-15, atol=0)  # the foreach add may fuse
        else:
            assert foreach[k] is grads[k] and per_leaf[k] is grads[k]


def test_negative_weight_decay_is_named():
    with pytest.raises(ValueError, match=r"add_decayed_weights: weight_decay must be >= 0"):
        ft.transforms.add_decayed_weights(-0.1)


def test_partition_names_transforms_when_it_is_not_a_dict():
    with pytest.raises(TypeError, match="transforms must be a dict label -> GradientTransformation"):
        ft.partition([ft.sgd(lr=0.1)], lambda name, p: 0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.partition({"a": ft.sgd(lr=1.0), "b": ft.set_to_zero()}, {"a": "a", "b": "b"}),
        lambda: ft.masked(ft.sgd(lr=1.0), {"a": True, "b": False}),
    ],
    ids=["partition", "masked"],
)
def test_updates_of_another_structure_than_the_params_are_refused(make):
    """Updates in another key order would otherwise be routed by position, to the wrong parameters."""
    tx = make()
    params = {"a": torch.ones(2), "b": torch.ones(2)}
    grads = {"b": torch.full((2,), 5.0), "a": torch.ones(2)}
    with pytest.raises(_tree.TreeMismatchError, match="updates and params"):
        tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("which", ["partition", "masked"])
def test_labels_are_computed_once_per_tree_signature(which):
    calls = []

    def label(name, p):
        calls.append(name)
        return p.ndim >= 2

    if which == "partition":
        tx = ft.partition({True: ft.sgd(lr=0.1), False: ft.set_to_zero()}, label)
    else:
        tx = ft.masked(ft.sgd(lr=0.1), label)
    params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(gradient(params, 0), state, params)
    assert calls == ["w", "b"]
    assert torch.equal(updates["b"], torch.zeros(2) if which == "partition" else gradient(params, 0)["b"])
    other = {"w": torch.ones(2, 2), "b": torch.ones(3)}  # a new signature is labelled afresh
    tx.update(gradient(other, 0), tx.init(other), other)
    assert calls == ["w", "b", "w", "b"]
