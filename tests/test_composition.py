"""Everything composes with everything: a realistic recipe against an imperative torch.optim loop,
and the same recipe compiled into one graph that never recompiles."""

from __future__ import annotations

import contextlib

import pytest
import torch

import functrain as ft
from functrain import _tree

from .harness import gradient, make_params, relative_error

MICRO = 2  # micro-batches per optimiser step
NAN_AT = {5}  # a non-finite micro-batch: its whole window (calls 4 and 5) is skipped
CALLS = 12


def frozen(name, _):
    return "frozen" if name == "b" else "train"


def recipe(lr):
    """Per-group AdamW (injected lr, possibly a schedule) + a frozen group, clipped, skipping
    non-finite windows, accumulated over MICRO micro-batches."""
    groups = ft.partition(
        {"train": ft.inject_hyperparams(ft.adamw)(lr=lr, weight_decay=0.1), "frozen": ft.set_to_zero()}, frozen
    )
    return ft.accumulate(ft.apply_if_finite(ft.chain(ft.clip_by_global_norm(1.0), groups), 2), every=MICRO)


def micro_grads(params, call):
    if call in NAN_AT:
        return _tree.map(lambda p: torch.full_like(p, float("nan")), params)
    return gradient(params, call)


def reference(params, lr_at):
    """The recipe written imperatively: mean of MICRO gradients, skip a window with a NaN,
    clip_grad_norm_ over every parameter, AdamW on the trainable ones only."""
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    trainable = [v for k, v in tensors.items() if frozen(k, v) == "train"]
    opt = torch.optim.AdamW(trainable, lr=lr_at(0), weight_decay=0.1)
    window, steps = [], 0
    for call in range(CALLS):
        window.append(micro_grads({k: v.detach() for k, v in tensors.items()}, call))
        if len(window) < MICRO:
            continue
        mean = {k: sum(g[k] for g in window) / MICRO for k in tensors}
        window = []
        if not all(torch.isfinite(g).all() for g in mean.values()):
            continue
        for k, v in tensors.items():
            v.grad = mean[k].clone()
        torch.nn.utils.clip_grad_norm_(list(tensors.values()), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(steps)
        opt.step()
        steps += 1
    return {k: v.detach() for k, v in tensors.items()}


def run(tx, params, update=None, between=None):
    update = update or (lambda p, s, g: _apply(tx, p, s, g))
    state = tx.init(params)
    for call in range(CALLS):
        if between is not None:
            state = between(call, state)
        params, state = update(params, state, micro_grads(params, call))
    return params, state


def _apply(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return ft.apply_updates(params, updates), state


def test_recipe_equals_the_imperative_loop():
    params = make_params()
    ours, state = run(recipe(0.05), params)
    assert relative_error(ours, reference(params, lambda t: 0.05)) <= 1e-10
    assert torch.equal(ours["b"], params["b"])  # frozen
    inner = state.inner_state  # accumulate -> apply_if_finite
    assert int(inner.total_notfinite) == 1 and int(state.gradient_step) == CALLS // MICRO
    adam_state = inner.inner_state[1].inner_states["train"].inner_state
    assert "b" not in adam_state.inner_state[0].mu  # the frozen group holds no optimiser state


def test_recipe_with_a_schedule_equals_torch_scheduler():
    params = make_params()
    schedule = ft.schedules.cosine_annealing_lr(0.05, T_max=4)
    torch_lrs = []
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    for _ in range(CALLS):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    ours, _ = run(recipe(schedule), params)
    # The schedule advances once per optimiser step of the injected AdamW, i.e. once per applied window.
    assert relative_error(ours, reference(params, lambda t: torch_lrs[t])) <= 1e-10


def test_a_mask_function_is_not_mistaken_for_a_schedule():
    params = make_params()
    decay_matrices = lambda name, p: p.ndim >= 2  # noqa: E731
    injected = ft.inject_hyperparams(ft.transforms.add_decayed_weights)(weight_decay=0.1, mask=decay_matrices)
    state = injected.init(params)
    assert set(state.hyperparams) == {"weight_decay"}
    plain = ft.transforms.add_decayed_weights(0.1, mask=decay_matrices)
    grads = gradient(params, 0)
    updates = injected.update(grads, state, params)[0]
    assert relative_error(updates, plain.update(grads, (), params)[0]) <= 1e-15
    assert updates["b"] is grads["b"] and not torch.equal(updates["w"], grads["w"])


# ----------------------------------------------------------------------------- compiled


@pytest.fixture(scope="module")
def compiled_recipe():
    tx = recipe(0.05)
    return tx, torch.compile(lambda p, s, g: _apply(tx, p, s, g), fullgraph=True)


def with_lr(state, lr):
    """The recipe's state with the injected learning rate replaced."""
    partition_state = state.inner_state.inner_state[1]
    inject = partition_state.inner_states["train"]
    inject = inject._replace(hyperparams={**inject.hyperparams, "lr": torch.tensor(lr, dtype=torch.float64)})
    chain_state = (
        state.inner_state.inner_state[0],
        partition_state._replace(inner_states={**partition_state.inner_states, "train": inject}),
    )
    return state._replace(inner_state=state.inner_state._replace(inner_state=chain_state))


@pytest.mark.slow
def test_compiled_recipe_equals_eager_and_never_recompiles(compiled_recipe):
    tx, compiled = compiled_recipe
    params = make_params(torch.float32)

    def moving_lr(call, state):
        return with_lr(state, 0.05 / (1 + call)) if call % 3 == 0 else state

    eager, _ = run(tx, params, between=moving_lr)
    calls = []

    def update(p, s, g):  # the first call compiles; every later one must reuse that graph
        calls.append(None)
        with contextlib.nullcontext() if len(calls) == 1 else torch.compiler.set_stance("fail_on_recompile"):
            return compiled(p, s, g)

    ours, state = run(tx, params, update=update, between=moving_lr)
    assert relative_error(ours, eager) <= 1e-5
    assert int(state.inner_state.total_notfinite) == 1
