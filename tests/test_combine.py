"""partition and set_to_zero."""

from __future__ import annotations

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
    assert state_elements == 2 * params["head.weight"].numel() + 1  # mu, nu and the step count
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
