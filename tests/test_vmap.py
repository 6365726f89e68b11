"""ft.vmap: ensembles and sweeps as one step. torch.func.vmap of a compiled step cannot run (dynamo does not
trace a call made under vmap) and says where to go; ft.vmap of a compiled step is one compiled graph, equal
to each model's own step to rounding, with no recompiles when hyperparameters move."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft

K = 4


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def stacked_batches(n: int = 3):
    """n rounds of K batches of 6, one per model."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(K, 6, 8, generator=g), torch.randint(0, 3, (K, 6), generator=g)) for _ in range(n)]


def ensemble(tx):
    return [ft.TrainState.create(make_model(seed=i), tx) for i in range(K)]


def assert_each_model_equals_its_own_step(step, vstep, tx):
    states = ensemble(tx)
    stacked = ft.stack_states(states)
    for x, y in stacked_batches():
        stacked, metrics = vstep(stacked, (x, y))
        alone = [step(s, (x[i], y[i])) for i, s in enumerate(states)]
        states = [s for s, _ in alone]
        torch.testing.assert_close(metrics["loss"], torch.stack([m["loss"] for _, m in alone]))
    for mine, together in zip(states, ft.unstack_states(stacked)):
        torch.testing.assert_close(together, mine, rtol=1e-5, atol=1e-6)


def test_vmap_of_an_eager_step_trains_each_model_on_its_own_batch():
    tx = ft.adamw(1e-2)
    step = ft.make_train_step(make_model(), loss_fn, tx)
    assert_each_model_equals_its_own_step(step, ft.vmap(step, in_dims=(0, 0)), tx)


@pytest.mark.slow
def test_vmap_of_a_compiled_step_is_one_graph_equal_to_each_step_and_never_recompiles():
    """A scheduled learning rate and a moved weight decay: one graph, no recompile."""
    tx = ft.inject_hyperparams(ft.adamw)(lr=ft.schedules.cosine_annealing_lr(1e-2, T_max=10), weight_decay=0.01)
    step = ft.make_train_step(make_model(), loss_fn, tx)
    vstep = ft.vmap(ft.make_train_step(make_model(), loss_fn, tx, compile=True), in_dims=(0, 0))
    torch._dynamo.utils.counters.clear()
    assert_each_model_equals_its_own_step(step, vstep, tx)
    # a sweep: each model its own weight decay, stacked like every other state tensor
    stacked = ft.stack_states([ft.set_hyperparams(s, weight_decay=0.05 * i) for i, s in enumerate(ensemble(tx))])
    for batch in stacked_batches():
        stacked, _ = vstep(stacked, batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["recompiles"]


@pytest.mark.slow
def test_torch_func_vmap_of_a_compiled_step_says_to_use_ft_vmap():
    tx = ft.adamw(1e-2)
    step = ft.make_train_step(make_model(), loss_fn, tx, compile=True)
    x, y = stacked_batches(1)[0]
    with pytest.raises(TypeError, match=r"ft.vmap\(step, in_dims=\(0, 0\)\) compiles the vmapped step"):
        torch.func.vmap(step, in_dims=(0, 0))(ft.stack_states(ensemble(tx)), (x, y))


def test_vmap_arguments_are_checked():
    step = ft.make_train_step(make_model(), loss_fn, ft.sgd(0.1))
    with pytest.raises(ValueError, match="vmap: randomness must be one of"):
        ft.vmap(step, randomness="independent")
    with pytest.raises(TypeError, match="vmap: step must be a step"):
        ft.vmap("step")
