"""accumulate, apply_if_finite, ema_params, lookahead and reduce_on_plateau against imperative references."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import functrain as ft
from functrain import _tree

from .harness import gradient, make_params, relative_error, run_functrain

NAN = float("nan")


def nan_like(grads):
    return {k: torch.full_like(v, NAN) for k, v in grads.items()}


# ----------------------------------------------------------------------------- accumulate


def regression_problem(n=12, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def mse_grad(params, x, y):
    """The gradient of the mean squared error of a linear model (mean over the batch)."""

    def loss(p):
        return ((x @ p["w"] + p["b"] - y) ** 2).mean()

    return torch.func.grad(loss)(params)


def test_accumulate_over_micro_batches_equals_one_step_on_the_full_batch():
    x, y = regression_problem()
    params = {"w": torch.zeros(3, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    k = 3
    tx_acc, tx_full = ft.accumulate(ft.adam(lr=0.05), every=k), ft.adam(lr=0.05)
    ours, state = params, tx_acc.init(params)
    reference, ref_state = params, tx_full.init(params)
    for _ in range(6):
        for i, (xb, yb) in enumerate(zip(x.chunk(k), y.chunk(k))):
            before = ours
            updates, state = tx_acc.update(mse_grad(ours, xb, yb), state, ours)
            ours = ft.apply_updates(ours, updates)
            last = i == k - 1
            assert bool(ft.accumulate_has_updated(state)) == last
            assert int(state.mini_step) == (0 if last else i + 1)
            if not last:  # the micro-steps leave the params exactly where they were
                assert all(torch.equal(ours[n], before[n]) for n in ours)
        updates, ref_state = tx_full.update(mse_grad(reference, x, y), ref_state, reference)
        reference = ft.apply_updates(reference, updates)
        assert relative_error(ours, reference) <= 1e-13
    assert int(state.gradient_step) == 6


def test_accumulate_every_1_is_the_inner_transform_exactly():
    params = make_params()
    ours = run_functrain(ft.accumulate(ft.adamw(lr=0.01, weight_decay=0.1), every=1), params, 10)
    reference = run_functrain(ft.adamw(lr=0.01, weight_decay=0.1), params, 10)
    assert all(torch.equal(ours[k], reference[k]) for k in params)


def test_accumulate_holds_one_gradient_buffer_beside_the_inner_state():
    params = make_params()
    inner = ft.adam(lr=0.1)

    def elements(state):
        return sum(leaf.numel() for leaf in _tree.leaves(state))

    extra = elements(ft.accumulate(inner, every=4).init(params)) - elements(inner.init(params))
    assert extra == sum(p.numel() for p in params.values()) + 2  # the sum, mini_step and gradient_step


# ----------------------------------------------------------------------------- apply_if_finite


def test_apply_if_finite_equals_the_run_without_the_bad_steps():
    params = make_params()
    bad = {2, 3, 7, 8, 9, 12}
    tx = ft.apply_if_finite(ft.adam(lr=0.05), max_consecutive_errors=3)
    ours, state = params, tx.init(params)
    consecutive = total = 0
    for t in range(15):
        grads = nan_like(params) if t in bad else gradient(ours, t)
        if t == 12:  # finite gradients, non-finite updates: one inf leaf
            grads = {**gradient(ours, t), "s": torch.tensor(float("inf"), dtype=torch.float64)}
        updates, state = tx.update(grads, state, ours)
        ours = ft.apply_updates(ours, updates)
        consecutive, total = (consecutive + 1, total + 1) if t in bad else (0, total)
        assert (int(state.notfinite_count), int(state.total_notfinite)) == (consecutive, total)
        assert bool(state.last_finite) == (t not in bad)

    reference_tx = ft.adam(lr=0.05)
    reference, ref_state = params, reference_tx.init(params)
    for t in sorted(set(range(15)) - bad):
        updates, ref_state = reference_tx.update(gradient(reference, t), ref_state, reference)
        reference = ft.apply_updates(reference, updates)
    assert all(torch.equal(ours[k], reference[k]) for k in params)


def test_apply_if_finite_skips_finite_gradients_with_non_finite_updates():
    params = {"w": torch.tensor([1.0], dtype=torch.float64)}
    tx = ft.apply_if_finite(ft.sgd(lr=10.0), max_consecutive_errors=1)
    state = tx.init(params)
    updates, state = tx.update({"w": torch.tensor([1e308], dtype=torch.float64)}, state, params)  # -1e309 = -inf
    assert torch.equal(updates["w"], torch.zeros(1, dtype=torch.float64)) and not bool(state.last_finite)


def test_apply_if_finite_raises_after_more_than_max_consecutive_errors():
    params = make_params()
    tx = ft.apply_if_finite(ft.sgd(lr=0.1), max_consecutive_errors=2)
    state = tx.init(params)
    for _ in range(2):
        _, state = tx.update(nan_like(params), state, params)
    _, state = tx.update(gradient(params, 0), state, params)  # a finite step resets the count
    for _ in range(2):
        _, state = tx.update(nan_like(params), state, params)
    with pytest.raises(RuntimeError, match="max_consecutive_errors=2"):
        tx.update(nan_like(params), state, params)


# ----------------------------------------------------------------------------- ema_params


def test_ema_params_equals_averaged_model_with_ema_avg_fn():
    params = make_params()
    decay = 0.9
    tx = ft.chain(ft.adam(lr=0.05), ft.ema_params(decay))
    state = tx.init(params)
    assert all(torch.equal(ft.ema_params_of(state)[k], params[k]) for k in params)  # AveragedModel's deepcopy
    model = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone()) for k, v in params.items()})
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    ours = params
    for t in range(30):
        updates, state = tx.update(gradient(ours, t), state, ours)
        ours = ft.apply_updates(ours, updates)
        grads = gradient({k: model[k].detach() for k in params}, t)  # in params' order (ParameterDict sorts)
        for k, p in model.items():
            p.grad = grads[k]
        optimizer.step()
        averaged.update_parameters(model)
    expected = {k: averaged.module[k].detach() for k in params}
    assert relative_error(ft.ema_params_of(state), expected) <= 1e-12
    assert relative_error(ours, {k: model[k].detach() for k in params}) <= 1e-12  # updates pass through
    assert relative_error(ft.ema_params_of(state), ours) > 1e-3  # an average, not the params


def test_ema_params_of_needs_exactly_one_ema_state():
    params = make_params()
    with pytest.raises(ValueError, match="found 0"):
        ft.ema_params_of(ft.adam().init(params))
    with pytest.raises(ValueError, match="found 2"):
        ft.ema_params_of(ft.chain(ft.ema_params(0.9), ft.ema_params(0.9)).init(params))


# ----------------------------------------------------------------------------- lookahead


def lookahead_reference(params, steps, sync_period, alpha, lr):
    """Zhang et al. 2019, Algorithm 1, around torch.optim.Adam (whose state carries across syncs)."""
    fast = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    slow = {k: v.clone() for k, v in params.items()}
    optimizer = torch.optim.Adam(list(fast.values()), lr=lr)
    for t in range(steps):
        grads = gradient({k: v.detach() for k, v in fast.items()}, t)
        for k, p in fast.items():
            p.grad = grads[k]
        optimizer.step()
        if (t + 1) % sync_period == 0:
            with torch.no_grad():
                for k, p in fast.items():
                    slow[k] = slow[k] + alpha * (p - slow[k])
                    p.copy_(slow[k])
    return {k: v.detach() for k, v in fast.items()}


@pytest.mark.parametrize("sync_period", [3, 5])
def test_lookahead_equals_the_papers_algorithm_around_adam(sync_period):
    params = make_params()
    ours = run_functrain(ft.lookahead(ft.adam(lr=0.05), sync_period=sync_period, alpha=0.5), params, 20)
    reference = lookahead_reference(params, 20, sync_period, 0.5, 0.05)
    assert relative_error(ours, reference) <= 1e-12
    assert relative_error(ours, run_functrain(ft.adam(lr=0.05), params, 20)) > 1e-3


# ----------------------------------------------------------------------------- reduce_on_plateau


def plateau_losses(steps=60, seed=3):
    """A staircase (a drop every 12 steps) with noise, so some steps improve and others stall."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(steps, generator=g, dtype=torch.float64)
    return [1.0 / (1 + t // 12) + 0.02 * noise[t].item() for t in range(steps)]


PLATEAU_CASES = {
    "min-rel": dict(mode="min", factor=0.5, patience=2, threshold=1e-4, threshold_mode="rel"),
    "min-abs-cooldown": dict(mode="min", factor=0.5, patience=1, threshold=0.05, threshold_mode="abs", cooldown=2),
    "max-rel": dict(mode="max", factor=0.3, patience=1, threshold=0.01, threshold_mode="rel"),
    "max-abs-patience-0": dict(mode="max", factor=0.7, patience=0, threshold=0.0, threshold_mode="abs"),
    "min-lr-reached": dict(mode="min", factor=0.5, patience=0, threshold=0.1, min_lr=0.1 * 0.03),
    "eps-stops-reductions": dict(mode="min", factor=0.5, patience=0, threshold=0.1, eps=0.015),
}


@pytest.mark.parametrize("case", PLATEAU_CASES)
@pytest.mark.parametrize("accumulation_size", [1, 3])
def test_reduce_on_plateau_equals_torch_scheduler(case, accumulation_size):
    torch_kwargs = PLATEAU_CASES[case]
    base_lr = 0.1
    losses = plateau_losses()
    if torch_kwargs["mode"] == "max":
        losses = [-v for v in losses]
    ours_kwargs = {k: v for k, v in torch_kwargs.items() if k not in ("min_lr", "eps")}
    ours_kwargs["min_scale"] = torch_kwargs.get("min_lr", 0.0) / base_lr
    ours_kwargs["eps"] = torch_kwargs.get("eps", 1e-8) / base_lr
    tx = ft.chain(ft.sgd(lr=base_lr), ft.reduce_on_plateau(**ours_kwargs, accumulation_size=accumulation_size))

    params = make_params()
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.SGD(list(tensors.values()), lr=base_lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **torch_kwargs)
    ours, state = params, tx.init(params)
    our_lrs, torch_lrs = [], []
    for t, loss in enumerate(losses):
        our_lrs.append(base_lr * float(state[1].scale))
        updates, state = tx.update(gradient(ours, t), state, ours, value=torch.tensor(loss))
        ours = ft.apply_updates(ours, updates)

        torch_lrs.append(optimizer.param_groups[0]["lr"])
        grads = gradient({k: v.detach() for k, v in tensors.items()}, t)
        for k, p in tensors.items():
            p.grad = grads[k]
        optimizer.step()
        if (t + 1) % accumulation_size == 0:  # one decision per window, on the window's mean loss
            scheduler.step(sum(losses[t + 1 - accumulation_size : t + 1]) / accumulation_size)
    assert our_lrs == pytest.approx(torch_lrs, rel=1e-13, abs=0.0)
    assert len(set(torch_lrs)) >= (3 if accumulation_size == 1 else 2)  # the case did reduce (more than once)
    assert relative_error(ours, {k: v.detach() for k, v in tensors.items()}) <= 1e-12


def test_reduce_on_plateau_stops_at_min_lr_and_obeys_eps():
    """The cases above reach their floors: min_lr is hit, and eps stops 0.025 -> 0.0125 (a drop <= 0.015)."""
    for case, floor in [("min-lr-reached", 0.1 * 0.03), ("eps-stops-reductions", 0.025)]:
        kwargs = PLATEAU_CASES[case]
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)
        for loss in plateau_losses():
            scheduler.step(loss)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(floor)


def test_reduce_on_plateau_needs_the_loss():
    params = make_params()
    tx = ft.reduce_on_plateau()
    with pytest.raises(ValueError, match="value=loss"):
        tx.update(gradient(params, 0), tx.init(params), params)


# ----------------------------------------------------------------------------- validation and checkpoints


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: ft.accumulate(ft.sgd(), every=0), ValueError, "every must be an int >= 1"),
        (lambda: ft.accumulate(ft.sgd(), every=2.0), TypeError, "every"),
        (lambda: ft.accumulate(ft.sgd(), every=True), TypeError, "every"),
        (lambda: ft.accumulate(ft.sgd, every=2), TypeError, "GradientTransformation"),
        (lambda: ft.apply_if_finite(ft.sgd(), -1), ValueError, "max_consecutive_errors"),
        (lambda: ft.ema_params(1.5), ValueError, "decay"),
        (lambda: ft.lookahead(ft.sgd(), sync_period=0), ValueError, "sync_period"),
        (lambda: ft.lookahead(ft.sgd(), alpha=-0.1), ValueError, "alpha"),
        (lambda: ft.reduce_on_plateau(factor=1.0), ValueError, "factor"),
        (lambda: ft.reduce_on_plateau(mode="lowest"), ValueError, "mode"),
        (lambda: ft.reduce_on_plateau(threshold_mode="pct"), ValueError, "threshold_mode"),
        (lambda: ft.reduce_on_plateau(patience=-1), ValueError, "patience"),
        (lambda: ft.reduce_on_plateau(cooldown=1.5), TypeError, "cooldown"),
        (lambda: ft.reduce_on_plateau(accumulation_size=0), ValueError, "accumulation_size"),
    ],
)
def test_bad_arguments_are_rejected(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_states_round_trip_weights_only():
    params = make_params()
    tx = ft.chain(
        ft.accumulate(ft.apply_if_finite(ft.lookahead(ft.adam(lr=0.1), 2), 3), every=2),
        ft.reduce_on_plateau(),
        ft.ema_params(0.9),
    )
    state = tx.init(params)
    for t in range(3):
        _, state = tx.update(gradient(params, t), state, params, value=1.0)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert _tree.structure(loaded) == _tree.structure(state)
    assert all(torch.equal(a, b) for a, b in zip(_tree.leaves(loaded), _tree.leaves(state)))


# ----------------------------------------------------------------------------- compiled


@pytest.fixture(scope="module")
def composed():
    """accumulate(apply_if_finite(inject_hyperparams(adamw))): eager step and its compiled twin."""
    torch._dynamo.reset()
    tx = ft.accumulate(ft.apply_if_finite(ft.inject_hyperparams(ft.adamw)(lr=1e-2, weight_decay=1e-2), 3), every=2)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return ft.apply_updates(params, updates), state

    return tx, step, torch.compile(step, fullgraph=True)


def with_lr(state, lr):
    inject = state.inner_state.inner_state
    hyperparams = {**inject.hyperparams, "lr": torch.tensor(lr, dtype=torch.float64)}
    return state._replace(inner_state=state.inner_state._replace(inner_state=inject._replace(hyperparams=hyperparams)))


@pytest.mark.slow
def test_composition_compiled_equals_eager_without_recompiling(composed):
    tx, step, compiled = composed
    params = make_params(torch.float32)
    eager = (params, tx.init(params))
    ours = (params, tx.init(params))
    nan_at = {3}  # a NaN micro-batch: its whole window (calls 2 and 3) is skipped
    for t in range(8):
        if t == 4:  # a new lr, changed in the state: the compiled step must not recompile
            eager, ours = (eager[0], with_lr(eager[1], 1e-3)), (ours[0], with_lr(ours[1], 1e-3))
        grads = nan_like(ours[0]) if t in nan_at else gradient(ours[0], t)
        with contextlib.nullcontext() if t == 0 else torch.compiler.set_stance("fail_on_recompile"):
            ours = compiled(*ours, grads)
        eager = step(*eager, nan_like(eager[0]) if t in nan_at else gradient(eager[0], t))
        assert relative_error(ours[0], eager[0]) <= 1e-6
    for state in (ours[1], eager[1]):
        assert (int(state.inner_state.total_notfinite), int(state.gradient_step)) == (1, 4)
    assert relative_error(ours[0], params) > 1e-3  # the finite windows did move the params


@pytest.mark.slow
def test_too_many_non_finite_steps_raise_compiled_as_in_eager(composed):
    """Under torch.compile the assertion is in the graph (aten._assert_async) and raises on the
    same call as in eager mode; with accumulate outside, the discarded inner update on the first
    micro-step of a window already sees the non-finite sum, so that is where it fires."""
    tx, step, compiled = composed
    params = make_params(torch.float32)

    def calls_until_raise(fn):
        state, p = tx.init(params), params
        for call in range(20):
            try:
                p, state = fn(p, state, nan_like(p))
            except RuntimeError as error:
                assert "max_consecutive_errors=3" in str(error)
                return call
        return None

    eager_call = calls_until_raise(step)
    compiled(params, tx.init(params), gradient(params, 0))  # compiles here if this worker has not yet
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled_call = calls_until_raise(compiled)
    # Windows 1-3 end at calls 1, 3, 5 with counts 1-3 (allowed); the 4th window would end at
    # call 7 with count 4 > 3, and its first micro-step (call 6) already computes that count.
    assert eager_call == compiled_call == 6


def test_lookahead_refuses_a_schedule_for_alpha():
    with pytest.raises(TypeError, match="alpha must be a float or a 0-d tensor"):
        ft.lookahead(ft.sgd(lr=0.1), alpha=lambda count: count * 0.0 + 0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "decay",
    [0.9, torch.tensor(0.99, dtype=torch.float64), lambda count: 0.5 + 0.1 * (count % 2).to(torch.float64)],
    ids=["float", "tensor", "schedule"],
)
def test_ema_multi_tensor_lerp_equals_the_per_leaf_reference(dtype, decay, monkeypatch):
    def run():
        tx = ft.chain(ft.sgd(lr=0.1), ft.ema_params(decay))
        params = make_params(dtype)
        state = tx.init(params)
        for t in range(4):
            updates, state = tx.update(gradient(params, t), state, params)
            params = ft.apply_updates(params, updates)
        return ft.ema_params_of(state), params

    fast, _ = run()
    monkeypatch.setattr(_tree, "fast_path_ok", lambda leaves: False)
    reference, _ = run()
    assert all(torch.equal(fast[k], reference[k]) and fast[k].dtype == dtype for k in fast)


def test_ema_first_update_copies_the_params_exactly_on_the_fast_path():
    params = {"w": torch.randn(1000)}
    tx = ft.ema_params(0.999)
    updates = {"w": torch.randn(1000)}
    _, state = tx.update(updates, tx.init(params), params)
    assert torch.equal(state.ema["w"], ft.apply_updates(params, updates)["w"])
