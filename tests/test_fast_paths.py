"""The declared fast path (``GradientTransformation.update_and_apply``, DESIGN.md 2a) and the extra
arguments a training step passes (``value``, ``value_fn``).

Every fast path is equal to its reference, ``tx.update`` then ``ft.apply_updates``; combinators pass
it on or decline it in the type, never through attributes or ambient flags; donation is an argument.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain import _tree
from functrain.transforms import ScaleByAdamState


def params_and_grads(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(5, 4, generator=g, dtype=dtype), "b": torch.randn(4, generator=g, dtype=dtype)}
    grads = [{k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in params.items()} for _ in range(4)]
    return params, grads


def by_reference(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = ft.apply_updates(params, updates)
    return params, state


def by_fast_path(tx, params, grads, donate):
    state = tx.init(params)
    if donate:  # the caller gives its tensors up: work on copies so the test keeps the originals
        params, state = _tree.map(torch.clone, (params, state))
    for g in grads:
        params, state = ft.update_and_apply(tx, g, state, params, donate=donate)
    return params, state


def adamw():
    return ft.adamw(lr=1e-2, weight_decay=0.1)


def is_weight(name, p):
    return p.ndim == 2


# Combinators and wrappers: whether each passes AdamW's fast path on (True) or declines it (False).
OFFERS = {
    "adamw": (adamw, True),
    "adam": (lambda: ft.adam(lr=1e-2), True),
    "adam-amsgrad": (lambda: ft.adam(lr=1e-2, amsgrad=True), True),
    "chain(clip, adamw)": (lambda: ft.chain(ft.clip_by_global_norm(0.5), adamw()), True),
    "named_chain(clip, adamw)": (lambda: ft.named_chain(clip=ft.clip_by_global_norm(0.5), adamw=adamw()), True),
    "partition": (
        lambda: ft.partition({"w": adamw(), "b": ft.sgd(lr=0.1)}, lambda n, p: "w" if p.ndim == 2 else "b"),
        True,
    ),
    "masked": (lambda: ft.masked(adamw(), is_weight), True),
    "chain(adamw, clip)": (lambda: ft.chain(adamw(), ft.clip(1.0)), False),
    "adam-l2": (lambda: ft.adam(lr=1e-2, weight_decay=0.1), False),
    "adam-maximize": (lambda: ft.adam(lr=1e-2, maximize=True), False),
    "adamw-tensor-lr": (lambda: ft.adamw(lr=torch.tensor(1e-2)), False),
    "inject_hyperparams(adamw)": (lambda: ft.inject_hyperparams(ft.adamw)(lr=1e-2), False),
    "apply_if_finite": (lambda: ft.apply_if_finite(adamw(), 3), False),
    "accumulate": (lambda: ft.accumulate(adamw(), every=2), False),
    "dynamic_loss_scale": (lambda: ft.dynamic_loss_scale(adamw()), False),
    "lookahead": (lambda: ft.lookahead(adamw()), False),
    "sgd": (lambda: ft.sgd(lr=0.1, momentum=0.9), False),
}


@pytest.mark.parametrize("name", sorted(OFFERS))
def test_each_combinator_declares_whether_it_passes_the_fast_path_on(name):
    make, offers = OFFERS[name]
    assert (make().update_and_apply is not None) == offers


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", sorted(OFFERS))
def test_update_and_apply_equals_update_then_apply_updates(name, donate):
    """The fast path is torch's fused AdamW kernel where it runs, the foreach reference elsewhere:
    equal to the reference to float32 rounding (the kernel's arithmetic order is torch.optim's)."""
    tx = OFFERS[name][0]()
    params, grads = params_and_grads()
    expected, expected_state = by_reference(tx, params, grads)
    actual, actual_state = by_fast_path(tx, params, grads, donate)
    for a, e in zip(_tree.leaves((actual, actual_state)), _tree.leaves((expected, expected_state))):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_a_pure_fast_path_leaves_its_inputs_and_a_donated_one_writes_into_them():
    tx = adamw()
    params, grads = params_and_grads()
    state = tx.init(params)
    before = _tree.map(torch.clone, (params, state))
    new_params, new_state = ft.update_and_apply(tx, grads[0], state, params)
    assert all(torch.equal(a, b) for a, b in zip(_tree.leaves((params, state)), _tree.leaves(before)))
    donated_params, donated_state = ft.update_and_apply(tx, grads[0], state, params, donate=True)
    assert all(donated_params[k] is params[k] for k in params)
    assert all(donated_state.inner_state[0].mu[k] is state.inner_state[0].mu[k] for k in params)
    assert all(torch.equal(donated_params[k], new_params[k]) for k in params)  # the same kernel either way


def test_named_chain_and_chain_give_the_same_bits():
    """Both pass AdamW's fused apply on after the clipping (named_chain used to drop it)."""
    params, grads = params_and_grads()
    chained, _ = by_fast_path(ft.chain(ft.clip_by_global_norm(0.5), adamw()), params, grads, donate=False)
    named, _ = by_fast_path(
        ft.named_chain(clip=ft.clip_by_global_norm(0.5), adamw=adamw()), params, grads, donate=False
    )
    assert all(torch.equal(chained[k], named[k]) for k in params)


def test_a_wrapper_written_with_functools_wraps_does_not_inherit_the_fast_path():
    """The fast path is a field of the transformation, not an attribute of ``update``: a user's
    wrapper that builds a new transformation from a wrapped ``update`` takes the reference path,
    and so runs its own code on every step."""
    inner = adamw()
    calls = []

    @functools.wraps(inner.update)
    def update(updates, state, params=None, **extra):
        calls.append(1)
        return inner.update(_tree.scale(updates, 0.5), state, params, **extra)

    tx = ft.GradientTransformation(inner.init, update)
    assert tx.update_and_apply is None
    params, grads = params_and_grads()
    actual, _ = by_fast_path(tx, params, grads, donate=True)
    expected, _ = by_reference(tx, params, grads)
    assert len(calls) == 2 * len(grads)
    assert all(torch.equal(actual[k], expected[k]) for k in params)


def test_the_fused_kernel_refuses_trees_that_do_not_match_before_it_runs():
    """A moment of the wrong shape (a state from a smaller model with the same names) is named, not
    handed to the kernel, which would read past the end of the buffer."""
    tx = adamw()
    params, grads = params_and_grads()
    state = tx.init({"w": torch.zeros(3, 4), "b": torch.zeros(4)})
    named = r"ft\.adamw's state for these params and opt_state differ in shape at opt_state\.inner_state\[0\]\.mu"
    with pytest.raises(_tree.TreeMismatchError, match=named + r"\['w'\]: \(5, 4\) vs \(3, 4\)"):
        ft.update_and_apply(tx, grads[0], state, params)
    small = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    with pytest.raises(_tree.TreeMismatchError, match=r"params and updates \(gradients\) differ in shape at \['w'\]"):
        ft.update_and_apply(tx, small, tx.init(params), params)


def test_without_torchs_private_fused_kernel_adam_takes_the_foreach_path(monkeypatch):
    params, grads = params_and_grads()
    expected, _ = by_fast_path(adamw(), params, grads, donate=False)
    monkeypatch.delattr(torch, "_fused_adamw_")
    tx = adamw()
    assert tx.update_and_apply is None
    actual, _ = by_fast_path(tx, params, grads, donate=True)
    for k in params:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-5, atol=1e-6)


def test_without_functorchs_private_interpreter_stack_everything_counts_as_traced(monkeypatch):
    """``_tree.tracing`` reads a private functorch API; without it the reference paths run, and the
    step still trains (and still vmaps)."""
    assert not _tree.tracing()
    monkeypatch.delattr(torch._C._functorch, "peek_interpreter_stack")
    assert _tree.tracing() and not _tree.fast_path_ok([torch.ones(2)])
    params, grads = params_and_grads()
    expected, _ = by_reference(adamw(), params, grads)
    actual, _ = by_fast_path(adamw(), params, grads, donate=False)
    for k in params:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-5, atol=1e-6)


def test_a_fast_path_that_falls_back_keeps_the_state_it_was_given():
    """Under vmap the fused kernel cannot run: the declared fast path runs the reference instead."""
    tx = adamw()
    params, grads = params_and_grads()
    stacked_params = {k: torch.stack([v, v + 1]) for k, v in params.items()}
    stacked_grads = {k: torch.stack([v, -v]) for k, v in grads[0].items()}
    stacked_state = torch.func.vmap(tx.init)(stacked_params)
    new, state = torch.func.vmap(lambda g, s, p: ft.update_and_apply(tx, g, s, p))(
        stacked_grads, stacked_state, stacked_params
    )
    for i in range(2):
        one_params = {k: v[i] for k, v in stacked_params.items()}
        expected, _ = ft.update_and_apply(
            tx, {k: v[i] for k, v in stacked_grads.items()}, tx.init(one_params), one_params
        )
        for k in params:
            torch.testing.assert_close(new[k][i], expected[k], rtol=1e-5, atol=1e-6)
    assert isinstance(state.inner_state[0], ScaleByAdamState)


# ----------------------------------------------------------------------------- extra arguments from the step


def linear_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(16, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(16, 1, generator=g)
    return model, (x, y)


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def recording(log):
    """A stateless transform that records the extra arguments it is given and changes nothing."""

    def update(updates, state, params=None, **extra):
        log.append(extra)
        return updates, state

    return ft.GradientTransformation(lambda p: ft.EmptyState(), update)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_the_step_passes_the_loss_and_a_value_fn_that_reevaluates_it(microbatches):
    model, batch = linear_problem()
    log = []
    tx = ft.chain(recording(log), ft.sgd(lr=0.1))
    state = ft.TrainState.create(model, tx)
    step = ft.make_train_step(model, mse, tx, microbatches=microbatches)
    new, metrics = step(state, batch)
    (extra,) = log
    assert set(extra) == {"value", "value_fn"}
    assert torch.equal(extra["value"], metrics["loss"])
    # value_fn at the new params: the loss and gradient a fresh computation gives there.
    loss, grads = extra["value_fn"](new.params)
    expected_loss, expected_grads = torch.func.grad_and_value(
        lambda p: mse(lambda x: torch.func.functional_call(model, p, (x,)), batch), has_aux=False
    )(new.params)[::-1]
    torch.testing.assert_close(loss, expected_loss)
    for k in grads:
        torch.testing.assert_close(grads[k], expected_grads[k])


def test_value_fn_drops_batchnorm_updates():
    """A second evaluation must not move BatchNorm's running statistics a second time."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    _, batch = linear_problem()

    def sam_like(updates, state, params=None, **extra):
        extra["value_fn"](_tree.map(lambda p: p + 0.1, params))
        return updates, state

    tx = ft.chain(ft.GradientTransformation(lambda p: ft.EmptyState(), sam_like), ft.sgd(lr=0.1))
    plain = ft.make_train_step(model, mse, ft.sgd(lr=0.1))(ft.TrainState.create(model, ft.sgd(lr=0.1)), batch)[0]
    with_second_look = ft.make_train_step(model, mse, tx)(ft.TrainState.create(model, tx), batch)[0]
    for k in plain.buffers:
        assert torch.equal(plain.buffers[k], with_second_look.buffers[k])
    for k in plain.params:
        assert torch.equal(plain.params[k], with_second_look.params[k])


def _plateau_losses():
    # Falls, then plateaus twice: enough to trigger two reductions with patience=2 (exact in float32).
    return [4.0, 3.0, 2.5, 2.5, 2.625, 2.5625, 2.5, 2.75, 2.625, 2.6875, 2.75, 2.375]


class _LossIsTheBias(nn.Module):
    """A model whose loss is a value chosen per batch: the step's loss is exactly the listed one."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, target):
        return (self.w * 0).sum() + target


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_reduce_on_plateau_in_a_step_equals_torchs_reduce_lr_on_plateau(compile):
    """reduce_on_plateau reads the loss the step passes as ``value``; fed the same losses, its
    scale follows ``torch.optim.lr_scheduler.ReduceLROnPlateau``, and a compiled step never recompiles."""
    model = _LossIsTheBias()
    tx = ft.chain(ft.sgd(lr=1.0), ft.reduce_on_plateau(factor=0.5, patience=2, cooldown=1))
    state = ft.TrainState.create(model, tx)
    step = ft.make_train_step(model, lambda m, target: m(target), tx, compile=compile)
    reference_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(reference_opt, factor=0.5, patience=2, cooldown=1)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for loss in _plateau_losses():
            state, metrics = step(state, torch.tensor(loss))
            scheduler.step(loss)
            assert float(metrics["loss"]) == loss
            assert float(state.opt_state[1].scale) == reference_opt.param_groups[0]["lr"]
    assert reference_opt.param_groups[0]["lr"] < 0.5  # the losses did trigger reductions
