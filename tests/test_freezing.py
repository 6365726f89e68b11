"""Freezing through the optimiser: ``partition`` with ``set_to_zero``, ``freeze`` and chains of them declare
their frozen leaves (``GradientTransformation.frozen``), and ``make_train_step`` does not differentiate those
parameters. Every declared step equals the same transform with its declarations dropped (which differentiates
everything), bit for bit, and frozen parameters come back bit for bit as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from tests.test_loop import assert_bitwise_equal


class _CountBackward(torch.autograd.Function):
    """The identity; counts the backward passes that reach it."""

    calls = 0
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        _CountBackward.calls += 1
        return grad


class Spy(nn.Module):
    """Sits between the backbone and the head: its backward runs only when the backbone is differentiated."""

    def forward(self, x):
        return _CountBackward.apply(x)


def make_model(spy: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), Spy() if spy else nn.Identity(), nn.Linear(16, 3)
    )
    with torch.no_grad():
        model[0].weight[0, 0] = -0.0  # a frozen -0.0 must stay -0.0 (p + 0.0 would make it 0.0)
    return model


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def is_head(name, p) -> bool:
    return name.startswith("4.")


def is_backbone(name, p) -> bool:
    return not is_head(name, p)


def adamw():
    return ft.adamw(1e-2, weight_decay=0.1)


BACKBONE = frozenset({"0.weight", "0.bias", "1.weight", "1.bias"})
PATTERNS = {
    "partition": lambda: ft.partition(
        {"train": adamw(), "frozen": ft.set_to_zero()}, lambda n, p: "train" if is_head(n, p) else "frozen"
    ),
    "partition-clipped-group": lambda: ft.partition(
        {"train": ft.chain(ft.clip_by_global_norm(0.1), adamw()), "frozen": ft.set_to_zero()},
        lambda n, p: "train" if is_head(n, p) else "frozen",
    ),
    "masked-then-freeze": lambda: ft.chain(ft.masked(adamw(), is_head), ft.freeze(is_backbone)),
    "named-chain": lambda: ft.named_chain(adam=ft.masked(adamw(), is_head), frozen=ft.freeze(is_backbone)),
    "freeze-alone": lambda: ft.freeze(is_backbone),  # the head's raw gradients pass through as updates
}


def undeclared(tx: ft.GradientTransformation) -> ft.GradientTransformation:
    """The same transform without its declarations: the step differentiates every parameter."""
    return ft.GradientTransformation(tx.init, tx.update, tx.update_and_apply)


def batches(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def train(tx, *, inplace=False, step_fn=None):
    model = make_model(spy=step_fn is None)
    step = step_fn or ft.make_train_step(model, loss_fn, tx, inplace=inplace)
    state = initial = ft.TrainState.create(model, tx)
    initial = ft._tree.map(torch.clone, initial)
    _CountBackward.calls = 0
    for batch in batches():
        state, metrics = step(state, batch)
    return initial, state, metrics, _CountBackward.calls


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_a_declared_step_never_differentiates_the_frozen_params_and_equals_the_full_backward(pattern, inplace):
    tx = PATTERNS[pattern]()
    assert tx.frozen(ft.TrainState.create(make_model(), tx).params) == BACKBONE
    initial, state, metrics, backward_calls = train(tx, inplace=inplace)
    _, reference, reference_metrics, reference_calls = train(undeclared(tx), inplace=inplace)
    assert backward_calls == 0 and reference_calls == 3, "the backbone was differentiated"
    assert_bitwise_equal(state, reference)
    assert_bitwise_equal(metrics, reference_metrics)
    for name in BACKBONE:  # bit for bit, the planted -0.0 included
        assert torch.equal(state.params[name].view(torch.int32), initial.params[name].view(torch.int32)), name
    assert not torch.equal(state.params["4.weight"], initial.params["4.weight"]), "the head did not train"


def test_a_vmapped_declared_step_equals_each_model_trained_alone():
    """The torch.func route (a vmapped step): frozen params are closed over, not differentiated."""
    tx = PATTERNS["partition"]()
    model = make_model()
    step = ft.make_train_step(model, loss_fn, tx)
    states = [ft.TrainState.create(make_model(), tx) for _ in range(2)]
    states[1] = states[1]._replace(params={k: p * 1.5 for k, p in states[1].params.items()})
    stacked = ft.stack_states(states)
    vmapped = torch.func.vmap(step, in_dims=(0, None), randomness="same")
    for batch in batches():
        stacked, _ = vmapped(stacked, batch)
        states = [step(s, batch)[0] for s in states]
    for alone, together in zip(states, ft.unstack_states(stacked)):
        torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-7)
        assert torch.equal(together.params["0.weight"], alone.params["0.weight"])


@pytest.mark.slow
def test_a_compiled_declared_step_equals_the_compiled_full_backward():
    tx = PATTERNS["masked-then-freeze"]()
    runs = [  # no Spy: dynamo cannot trace its counter
        train(t, step_fn=ft.make_train_step(make_model(spy=False), loss_fn, t, compile=True))
        for t in (tx, undeclared(tx))
    ]
    (initial, state, _, _), (_, reference, _, _) = runs
    torch.testing.assert_close(state, reference, rtol=1e-6, atol=1e-7)
    for name in BACKBONE:
        assert torch.equal(state.params[name].view(torch.int32), initial.params[name].view(torch.int32)), name


def test_declarations_compose():
    params = ft.TrainState.create(make_model(), ft.sgd(0.1)).params
    everything = frozenset(params)
    head = everything - BACKBONE
    assert ft.set_to_zero().frozen(params) == everything
    assert ft.freeze(is_backbone).passes(params) == head
    assert ft.masked(adamw(), is_head).frozen is None and ft.masked(adamw(), is_head).passes(params) == BACKBONE
    # a chain freezes what every part freezes or passes, one part at least freezing it
    assert ft.chain(ft.freeze(is_backbone), ft.freeze(lambda n, p: n == "4.bias")).frozen(params) == BACKBONE | {
        "4.bias"
    }
    assert ft.chain(ft.masked(adamw(), is_head), ft.masked(adamw(), is_backbone)).frozen(params) == frozenset()
    # parts that read every gradient, or move frozen params, declare nothing
    clipped = ft.chain(ft.clip_by_global_norm(1.0), PATTERNS["partition"]())
    assert clipped.frozen is None and clipped.passes is None
    assert ft.chain(ft.freeze(is_backbone), adamw()).frozen is None  # AdamW's decay moves "frozen" params
    assert ft.adamw().frozen is None and ft.inject_hyperparams(ft.adamw)(lr=0.1).frozen is None


def test_set_to_zero_leaves_every_value_bit_for_bit_and_its_fast_path_returns_the_params():
    p = {"w": torch.tensor([-0.0, 0.0, 1.5, float("inf"), float("-inf"), float("nan"), -1e-45])}
    tx = ft.set_to_zero()
    updates, state = tx.update({"w": torch.randn(7)}, tx.init(p))
    assert torch.equal(ft.apply_updates(p, updates)["w"].view(torch.int32), p["w"].view(torch.int32))
    new, _ = ft.update_and_apply(tx, {"w": torch.randn(7)}, state, p)
    assert new["w"] is p["w"]
