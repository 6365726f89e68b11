"""make_train_step / make_eval_step: parity with imperative PyTorch, purity, in-place, precision,
microbatches, vmapped ensembles and differentiable steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain import _tree

# ----------------------------------------------------------------------------- fixtures


def mlp(dtype=torch.float64, batchnorm=True, dropout=0.0, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    # No bias before BatchNorm (it cancels out): its gradient would be rounding noise, which Adam's
    # normalisation amplifies into steps that differ between any two programs.
    layers = [nn.Linear(6, 16, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3)]
    return nn.Sequential(*layers).to(dtype)


def classification(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def batches(n, size=12, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 6, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)
    ]


def snapshot(tree):
    return _tree.map(lambda t: t.clone(), tree)


def assert_trees_equal(a, b, rtol=0.0):
    """Leaf by leaf, ``||a - b|| <= rtol * ||b||``: exact when ``rtol`` is 0."""
    _tree.check_same_structure(a, b)
    for (name, x), (_, y) in zip(_tree.named_leaves(a), _tree.named_leaves(b)):
        error = (x.double() - y.double()).norm().item()
        assert error <= rtol * y.double().norm().item(), f"{name}: ||a - b|| = {error:.3g}, ||b|| = {y.norm():.3g}"


def run_torch(model, make_opt, data, loss=classification):
    """The imperative reference: ``loss.backward(); opt.step()``."""
    opt = make_opt(model.parameters())
    model.train()
    for batch in data:
        opt.zero_grad()
        loss(model, batch)[0].backward()
        opt.step()
    return dict(model.named_parameters()), dict(model.named_buffers())


def run_steps(step, state, data):
    for batch in data:
        state, metrics = step(state, batch)
    return state, metrics


# ----------------------------------------------------------------------------- parity and purity


@pytest.mark.parametrize(
    "make_tx,make_opt",
    [
        (lambda: ft.adamw(lr=1e-2, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
        (lambda: ft.sgd(lr=0.1, momentum=0.9, nesterov=True), lambda p: torch.optim.SGD(p, 0.1, 0.9, nesterov=True)),
    ],
    ids=["adamw", "sgd-nesterov"],
)
def test_step_equals_backward_and_torch_optim_with_batchnorm(make_tx, make_opt):
    """Params and BatchNorm running statistics (num_batches_tracked too) equal the imperative loop."""
    data = batches(8)
    model = mlp()
    tx = make_tx()
    state = ft.TrainState.create(model, tx)
    state, _ = run_steps(ft.make_train_step(model, classification, tx), state, data)
    params, buffers = run_torch(mlp(), make_opt, data)
    assert_trees_equal(state.params, {k: v.detach() for k, v in params.items()}, rtol=1e-10)
    assert_trees_equal(state.buffers, buffers, rtol=1e-10)


@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace"])
def test_eager_adamw_step_is_torch_fused_adamw_bit_for_bit(inplace):
    """An eager step applies ft.adamw with torch's fused AdamW kernel run on the parameters
    themselves (no update buffer): the same arithmetic as torch.optim.AdamW(fused=True)."""
    model = mlp(batchnorm=False, dtype=torch.float32)
    tx = ft.adamw(lr=1e-2, weight_decay=0.1)
    data = batches(6, dtype=torch.float32)
    step = ft.make_train_step(model, classification, tx, inplace=inplace)
    state, _ = run_steps(step, snapshot(ft.TrainState.create(model, tx)), data)
    params, _ = run_torch(
        mlp(batchnorm=False, dtype=torch.float32),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
        data,
    )
    assert_trees_equal(state.params, {k: v.detach() for k, v in params.items()})


@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace"])
def test_eager_clipped_adamw_chain_is_clip_grad_norm_and_torch_fused_adamw(inplace):
    """``chain(clip_by_global_norm, adamw)`` offers AdamW's fused apply after the clipping: an eager
    step equals ``clip_grad_norm_`` then ``torch.optim.AdamW(fused=True)``."""
    model = mlp(batchnorm=False, dtype=torch.float32)
    tx = ft.chain(ft.clip_by_global_norm(0.5), ft.adamw(lr=1e-2, weight_decay=0.1))
    assert tx.update_and_apply is not None
    data = batches(6, dtype=torch.float32)
    step = ft.make_train_step(model, classification, tx, inplace=inplace)
    state, _ = run_steps(step, snapshot(ft.TrainState.create(model, tx)), data)
    reference = mlp(batchnorm=False, dtype=torch.float32)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    for batch in data:
        opt.zero_grad()
        classification(reference, batch)[0].backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        opt.step()
    assert_trees_equal(state.params, {k: v.detach() for k, v in reference.named_parameters()})


def test_step_is_pure_input_state_and_model_untouched():
    """functional_call lets BatchNorm write into the buffers it is handed: the step must hand it copies."""
    model = mlp()
    model_before = snapshot(dict(model.state_dict()))
    tx = ft.adam(lr=0.1)
    state = ft.TrainState.create(model, tx)
    before = snapshot(state)
    step = ft.make_train_step(model, classification, tx)
    new, _ = step(state, batches(1)[0])
    assert_trees_equal(state, before)
    assert_trees_equal(dict(model.state_dict()), model_before)
    assert not torch.equal(new.buffers["1.running_mean"], before.buffers["1.running_mean"])
    assert int(new.step) == 1 and int(state.step) == 0


def test_inplace_step_equals_pure_step_and_reuses_the_state_tensors():
    model = mlp()
    tx = ft.adamw(lr=1e-2)
    data = batches(5)
    pure, _ = run_steps(ft.make_train_step(model, classification, tx), ft.TrainState.create(model, tx), data)
    state = snapshot(ft.TrainState.create(model, tx))
    pointers = [t.data_ptr() for t in _tree.leaves(state)]
    inplace, _ = run_steps(ft.make_train_step(model, classification, tx, inplace=True), state, data)
    assert [t.data_ptr() for t in _tree.leaves(inplace)] == pointers
    assert_trees_equal(inplace, pure)


# Wrappers that keep the inner state on a skipped or discarded step: an eager in-place step donates
# its state (torch's fused Adam writes into the moments), so these must decline the fast path and
# still see the old moments after the inner update.
KEEP_INNER_STATE = {
    "apply_if_finite": lambda: ft.apply_if_finite(ft.adamw(lr=1e-2), max_consecutive_errors=5),
    "accumulate": lambda: ft.accumulate(ft.adamw(lr=1e-2), 2),
    "dynamic_loss_scale": lambda: ft.dynamic_loss_scale(ft.adamw(lr=1e-2), init_scale=2.0**10),
}


@pytest.mark.parametrize("name", sorted(KEEP_INNER_STATE))
def test_inplace_step_with_a_skipping_wrapper_equals_the_pure_step(name):
    model = mlp(batchnorm=False)
    data = batches(5)
    if name != "accumulate":  # accumulate discards the inner update on 1 call in 2 instead
        data[2] = (data[2][0].clone().fill_(float("nan")), data[2][1])  # a non-finite step, to be skipped
    tx = KEEP_INNER_STATE[name]()
    pure, _ = run_steps(ft.make_train_step(model, classification, tx), ft.TrainState.create(model, tx), data)
    inplace, _ = run_steps(
        ft.make_train_step(model, classification, tx, inplace=True), snapshot(ft.TrainState.create(model, tx)), data
    )
    assert_trees_equal(inplace, pure)
    assert all(bool(torch.isfinite(p).all()) for p in inplace.params.values())


def test_eager_inplace_adam_writes_the_moments_where_they_lie():
    """The donated fused-Adam path: no copies of the moments, the same numbers as the pure step."""
    model = mlp()
    tx = ft.adamw(lr=1e-2)
    state = snapshot(ft.TrainState.create(model, tx))
    mu = state.opt_state.inner_state[0].mu
    pointers = [t.data_ptr() for t in mu.values()]
    step = ft.make_train_step(model, classification, tx, inplace=True)
    new, _ = step(state, batches(1)[0])
    assert new.opt_state.inner_state[0].mu is mu and [t.data_ptr() for t in mu.values()] == pointers
    assert any(bool(t.ne(0).any()) for t in mu.values())


def test_eval_step_uses_running_statistics_and_changes_nothing():
    model = mlp()
    tx = ft.sgd(lr=0.1)
    state, _ = run_steps(ft.make_train_step(model, classification, tx), ft.TrainState.create(model, tx), batches(3))
    before = snapshot(state)
    batch = batches(1, seed=7)[0]
    metrics = ft.make_eval_step(model, classification)(state, batch)
    reference = mlp()
    reference.load_state_dict({**state.params, **state.buffers})
    reference.eval()
    with torch.no_grad():
        expected_loss, expected = classification(reference, batch)
    torch.testing.assert_close(metrics["loss"], expected_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["acc"], expected["acc"])
    assert_trees_equal(state, before)
    assert metrics["loss"].requires_grad is False


def test_metrics_are_zero_dim_tensors_and_loss_is_always_present():
    model = mlp(batchnorm=False)
    tx = ft.sgd(lr=0.1)
    step = ft.make_train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), tx)
    _, metrics = step(ft.TrainState.create(model, tx), batches(1)[0])
    assert list(metrics) == ["loss"]
    assert metrics["loss"].ndim == 0 and not metrics["loss"].requires_grad


def test_dropout_is_reproducible_from_a_seed():
    model = mlp(dropout=0.5)
    tx = ft.adam(lr=1e-2)
    step = ft.make_train_step(model, classification, tx)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(run_steps(step, ft.TrainState.create(model, tx), batches(4))[0])
    torch.manual_seed(124)
    other = run_steps(step, ft.TrainState.create(model, tx), batches(4))[0]
    assert_trees_equal(runs[0], runs[1])
    assert not torch.equal(runs[0].params["0.weight"], other.params["0.weight"])


def test_dropout_equals_torch_with_the_same_seed():
    """The step draws dropout masks from torch's global generator, exactly as the module would."""
    data = batches(4)
    model = mlp(dropout=0.3)
    tx = ft.sgd(lr=0.1)
    torch.manual_seed(5)
    state, _ = run_steps(ft.make_train_step(model, classification, tx), ft.TrainState.create(model, tx), data)
    reference = mlp(dropout=0.3)
    torch.manual_seed(5)
    params, _ = run_torch(reference, lambda p: torch.optim.SGD(p, lr=0.1), data)
    assert_trees_equal(state.params, {k: v.detach() for k, v in params.items()}, rtol=1e-12)


# ----------------------------------------------------------------------------- microbatches and precision


def test_microbatches_equal_one_full_batch_step():
    """Mean-reduced loss: the average of k microbatch gradients is the full-batch gradient."""
    model = mlp(batchnorm=False)
    tx = ft.adam(lr=1e-2)
    data = batches(4, size=12)
    full, m_full = run_steps(ft.make_train_step(model, classification, tx), ft.TrainState.create(model, tx), data)
    micro, m_micro = run_steps(
        ft.make_train_step(model, classification, tx, microbatches=3), ft.TrainState.create(model, tx), data
    )
    assert_trees_equal(micro.params, full.params, rtol=1e-12)
    torch.testing.assert_close(m_micro["loss"], m_full["loss"], rtol=1e-12, atol=0)
    torch.testing.assert_close(m_micro["acc"], m_full["acc"])


def test_bf16_autocast_keeps_fp32_master_weights_and_tracks_fp32():
    model = mlp(torch.float32, batchnorm=False)
    tx = ft.adamw(lr=1e-2)
    data = batches(10, dtype=torch.float32)
    fp32, m32 = run_steps(ft.make_train_step(model, classification, tx), ft.TrainState.create(model, tx), data)
    bf16, m16 = run_steps(
        ft.make_train_step(model, classification, tx, precision="bf16"), ft.TrainState.create(model, tx), data
    )
    assert all(p.dtype == torch.float32 for p in _tree.leaves(bf16.params))
    assert all(t.dtype == torch.float32 for t in _tree.leaves(bf16.opt_state) if t.is_floating_point())
    assert m16["loss"].dtype == torch.float32
    assert abs(m16["loss"].item() - m32["loss"].item()) < 0.05
    assert not torch.equal(bf16.params["0.weight"], fp32.params["0.weight"])  # autocast did run in bf16


def test_fp16_needs_loss_scaling():
    model = mlp(torch.float32, batchnorm=False)
    tx = ft.sgd(lr=0.1)
    step = ft.make_train_step(model, classification, tx, precision="fp16")
    with pytest.raises(ValueError, match="dynamic_loss_scale"):
        step(ft.TrainState.create(model, tx), batches(1, dtype=torch.float32)[0])


def grad_scaler_run(model, data, device):
    """The imperative reference: fp16 autocast, torch.amp.GradScaler and torch.optim.Adam(lr=1e-2),
    scale 2**10 growing every 2 clean steps. Returns the final params and the scaler."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
    for batch in data:
        opt.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            loss = classification(model, batch)[0]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return {k: v.detach() for k, v in model.named_parameters()}, scaler


def test_fp16_step_equals_autocast_and_grad_scaler():
    """fp16 autocast + dynamic_loss_scale == torch.autocast + torch.amp.GradScaler + torch.optim, on CPU."""
    data = batches(6, dtype=torch.float32)
    model = mlp(torch.float32, batchnorm=False)
    tx = ft.dynamic_loss_scale(ft.adam(lr=1e-2), init_scale=2.0**10, growth_interval=2)
    state, metrics = run_steps(
        ft.make_train_step(model, classification, tx, precision="fp16"), ft.TrainState.create(model, tx), data
    )
    reference, scaler = grad_scaler_run(mlp(torch.float32, batchnorm=False), data, "cpu")
    assert_trees_equal(state.params, reference, rtol=1e-6)
    assert state.opt_state.scale.item() == scaler.get_scale()
    assert metrics["loss_scale"].item() in (scaler.get_scale(), 2 * scaler.get_scale(), scaler.get_scale() / 2)


def test_dynamic_loss_scale_skips_overflow_and_follows_grad_scaler():
    """Gradients with injected infs: same skipped steps, same scale sequence as GradScaler."""
    torch.manual_seed(0)
    params = {"w": torch.randn(5)}
    tx = ft.dynamic_loss_scale(ft.sgd(lr=0.1, momentum=0.9), init_scale=16.0, growth_interval=3)
    state = tx.init(params)
    reference = params["w"].clone().requires_grad_(True)
    opt = torch.optim.SGD([reference], lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=3)
    ours = dict(params)
    for t in range(12):
        scaled_grad = torch.randn(5) * scaler.get_scale()
        if t in (2, 3, 7):
            scaled_grad[t % 5] = float("inf") if t != 3 else float("nan")
        updates, state = tx.update({"w": scaled_grad.clone()}, state, ours)
        ours = ft.apply_updates(ours, updates)
        reference.grad = scaled_grad.clone()
        scaler.scale(torch.zeros(()))  # GradScaler creates its scale lazily, in scale()
        scaler.step(opt)
        scaler.update()
        assert state.scale.item() == scaler.get_scale(), t
        torch.testing.assert_close(ours["w"], reference.detach(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- vmap and differentiation


def test_vmapped_ensemble_with_k_learning_rates_equals_k_runs():
    model = mlp(batchnorm=False)
    tx = ft.inject_hyperparams(ft.sgd)(lr=0.1, momentum=0.9)
    rates = [0.01, 0.05, 0.2]
    states = []
    for i, lr in enumerate(rates):
        s = ft.TrainState.create(mlp(batchnorm=False, seed=i), tx)
        hyper = {**s.opt_state.hyperparams, "lr": torch.tensor(lr, dtype=torch.float64)}
        states.append(s._replace(opt_state=s.opt_state._replace(hyperparams=hyper)))
    data = batches(5)
    step = ft.make_train_step(model, classification, tx)
    stacked, metrics = run_steps(torch.func.vmap(step, in_dims=(0, None)), ft.stack_states(states), data)
    assert metrics["loss"].shape == (3,)
    for i, lr in enumerate(rates):
        alone, _ = run_steps(
            ft.make_train_step(model, classification, ft.sgd(lr=lr, momentum=0.9)),
            ft.TrainState.create(mlp(batchnorm=False, seed=i), ft.sgd(lr=lr, momentum=0.9)),
            data,
        )
        assert_trees_equal(ft.unstack_states(stacked)[i].params, alone.params, rtol=1e-12)


@pytest.mark.slow
def test_an_eager_inplace_step_compiled_by_the_caller_around_vmap_equals_the_pure_ensemble():
    """``torch.compile(torch.func.vmap(step))`` of an ``inplace=True`` step: under the caller's
    compile the step does not donate (no context manager is traced); the stacked state is
    written where it lies and equals the pure vmapped step."""
    model = mlp(torch.float32, batchnorm=False)
    tx = ft.adamw(lr=1e-2)
    data = batches(3, dtype=torch.float32)
    stacked = ft.stack_states([ft.TrainState.create(mlp(torch.float32, batchnorm=False, seed=i), tx) for i in range(3)])
    pure_step = torch.func.vmap(ft.make_train_step(model, classification, tx), in_dims=(0, None))
    pure, _ = run_steps(pure_step, stacked, data)
    state = snapshot(stacked)
    pointers = [t.data_ptr() for t in _tree.leaves(state)]
    inplace_step = ft.make_train_step(model, classification, tx, inplace=True)
    state, _ = run_steps(torch.compile(torch.func.vmap(inplace_step, in_dims=(0, None)), fullgraph=True), state, data)
    assert [t.data_ptr() for t in _tree.leaves(state)] == pointers
    assert_trees_equal(state.params, pure.params, rtol=1e-5)


def regression(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def regression_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64))
        for _ in range(n)
    ]


def test_hypergradient_of_the_learning_rate_through_unrolled_steps():
    """d(validation loss after k steps)/d(lr), by torch.func.grad, equals central finite differences."""
    model = mlp(batchnorm=False)
    tx = ft.inject_hyperparams(ft.adam)(lr=0.01)
    step = ft.make_train_step(model, regression, tx)
    train, (val,) = regression_data(4, seed=2), regression_data(1, seed=3)
    initial = ft.TrainState.create(model, tx)

    def val_loss(lr):
        hyper = {**initial.opt_state.hyperparams, "lr": lr}
        state = initial._replace(opt_state=initial.opt_state._replace(hyperparams=hyper))
        state, _ = run_steps(step, state, train)
        # The eval step runs under no_grad; the validation loss is differentiated through the params.
        return F.mse_loss(torch.func.functional_call(model, state.params, (val[0],)), val[1])

    lr = torch.tensor(0.01, dtype=torch.float64)
    hypergrad = torch.func.grad(val_loss)(lr)
    h = 1e-6
    finite_difference = (val_loss(lr + h) - val_loss(lr - h)) / (2 * h)
    torch.testing.assert_close(hypergrad, finite_difference, rtol=1e-5, atol=1e-10)


def test_maml_gradient_through_inner_steps_equals_finite_differences():
    """The meta-gradient with respect to the initial params, along a random direction."""
    model = mlp(batchnorm=False)
    tx = ft.sgd(lr=0.1)
    step = ft.make_train_step(model, regression, tx)
    support, (query,) = regression_data(2, seed=4), regression_data(1, seed=5)
    initial = ft.TrainState.create(model, tx)

    def meta_loss(params):
        state, _ = run_steps(step, initial._replace(params=params), support)
        return F.mse_loss(torch.func.functional_call(model, state.params, (query[0],)), query[1])

    params = snapshot(initial.params)
    meta_grad = torch.func.grad(meta_loss)(params)
    direction = _tree.map(torch.randn_like, params)
    h = 1e-6
    plus = meta_loss(_tree.add_scaled(params, direction, h))
    minus = meta_loss(_tree.add_scaled(params, direction, -h))
    directional = sum((g * d).sum() for g, d in zip(_tree.leaves(meta_grad), _tree.leaves(direction)))
    torch.testing.assert_close(directional, (plus - minus) / (2 * h), rtol=1e-5, atol=1e-10)


# ----------------------------------------------------------------------------- bad input


def test_loss_fn_returning_a_non_scalar_is_named():
    model = mlp(batchnorm=False)
    tx = ft.sgd(lr=0.1)
    step = ft.make_train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), tx)
    with pytest.raises(TypeError, match=r"0-d floating-point loss.*shape \(12,\)"):
        step(ft.TrainState.create(model, tx), batches(1)[0])


def test_loss_fn_returning_an_integer_or_a_float_is_named():
    model = mlp(batchnorm=False)
    tx = ft.sgd(lr=0.1)
    for bad, what in [(lambda m, b: b[1].sum(), "torch.int64"), (lambda m, b: 1.0, "float")]:
        with pytest.raises(TypeError, match=what):
            ft.make_train_step(model, bad, tx)(ft.TrainState.create(model, tx), batches(1)[0])


def test_state_of_another_model_names_the_first_differing_parameter():
    tx = ft.sgd(lr=0.1)
    step = ft.make_train_step(mlp(), classification, tx)
    with pytest.raises(ValueError, match="the model's '1.weight' is missing from the state"):
        step(ft.TrainState.create(mlp(batchnorm=False), tx), batches(1)[0])
    wider = nn.Sequential(
        nn.Linear(6, 32, bias=False), nn.BatchNorm1d(32), nn.Tanh(), nn.Dropout(0.0), nn.Linear(32, 3)
    )
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(32, 6\) in the state but \(16, 6\)"):
        step(ft.TrainState.create(wider.double(), tx), batches(1)[0])


def test_a_batch_the_model_rejects_reports_the_step():
    model = mlp()
    tx = ft.sgd(lr=0.1)
    with pytest.raises(RuntimeError, match="train step: the model or loss_fn rejected the batch: .*mat1 and mat2"):
        ft.make_train_step(model, classification, tx)(
            ft.TrainState.create(model, tx), (torch.randn(4, 5).double(), torch.zeros(4).long())
        )


def test_bad_arguments_name_themselves():
    model, tx = mlp(), ft.sgd(lr=0.1)
    with pytest.raises(ValueError, match="precision"):
        ft.make_train_step(model, classification, tx, precision="fp8")
    with pytest.raises(ValueError, match="microbatches must be an int >= 1"):
        ft.make_train_step(model, classification, tx, microbatches=0)
    with pytest.raises(TypeError, match="tx must be a GradientTransformation"):
        ft.make_train_step(model, classification, torch.optim.SGD)
    with pytest.raises(ValueError, match=r"microbatches=5 must divide the batch size.*\(12, 6\)"):
        ft.make_train_step(model, classification, tx, microbatches=5)(ft.TrainState.create(model, tx), batches(1)[0])
    with pytest.raises(ValueError, match="growth_interval"):
        ft.dynamic_loss_scale(tx, growth_interval=0)


def test_non_finite_loss_is_reported_and_skipped_under_apply_if_finite():
    model = mlp(batchnorm=False)
    bad = (torch.full((12, 6), float("nan"), dtype=torch.float64), torch.zeros(12, dtype=torch.long))
    plain = ft.adam(lr=0.1)
    _, metrics = ft.make_train_step(model, classification, plain)(ft.TrainState.create(model, plain), bad)
    assert torch.isnan(metrics["loss"])
    guarded = ft.apply_if_finite(ft.adam(lr=0.1), max_consecutive_errors=2)
    step = ft.make_train_step(model, classification, guarded)
    state = ft.TrainState.create(model, guarded)
    good, bad_then_good = batches(2), [batches(1)[0], bad, batches(2)[1]]
    skipped, metrics = run_steps(step, state, bad_then_good)
    expected, _ = run_steps(step, state, good)
    assert_trees_equal(skipped.params, expected.params)  # the NaN step left no trace
    assert int(skipped.opt_state.total_notfinite) == 1


# ----------------------------------------------------------------------------- compiled


@pytest.fixture(scope="module")
def compiled_steps():
    model = mlp(torch.float32)
    tx = ft.inject_hyperparams(ft.adamw)(lr=1e-2, weight_decay=0.05)
    return (
        model,
        tx,
        ft.make_train_step(model, classification, tx, compile=True),
        ft.make_eval_step(model, classification, compile=True),
    )


@pytest.mark.slow
def test_compiled_step_equals_eager_and_never_recompiles(compiled_steps):
    """One graph per step; moving the learning rate and interleaving eval never recompile."""
    model, tx, step, evaluate = compiled_steps
    eager_step, eager_eval = ft.make_train_step(model, classification, tx), ft.make_eval_step(model, classification)
    data = batches(6, dtype=torch.float32)
    compiled_state = eager_state = ft.TrainState.create(model, tx)
    compiled_state, _ = step(compiled_state, data[0])
    evaluate(compiled_state, data[0])
    eager_state, _ = eager_step(eager_state, data[0])
    with torch.compiler.set_stance("fail_on_recompile"):
        for i, batch in enumerate(data[1:]):
            lr = torch.tensor(1e-2 / (i + 2), dtype=torch.float64)
            hyper = {**compiled_state.opt_state.hyperparams, "lr": lr}
            compiled_state = compiled_state._replace(opt_state=compiled_state.opt_state._replace(hyperparams=hyper))
            eager_state = eager_state._replace(opt_state=eager_state.opt_state._replace(hyperparams=hyper))
            compiled_state, compiled_metrics = step(compiled_state, batch)
            eager_state, eager_metrics = eager_step(eager_state, batch)
            torch.testing.assert_close(
                evaluate(compiled_state, batch), eager_eval(eager_state, batch), rtol=1e-5, atol=1e-6
            )
    assert_trees_equal(compiled_state.params, eager_state.params, rtol=1e-5)
    assert_trees_equal(compiled_state.buffers, eager_state.buffers, rtol=1e-5)


class Attention(nn.Module):
    """One head pair of self-attention with dropout inside ``scaled_dot_product_attention``."""

    def __init__(self, dropout: float):
        super().__init__()
        self.qkv, self.out, self.dropout = nn.Linear(16, 48), nn.Linear(16, 4), dropout

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2).mean(1))


@pytest.mark.slow
def test_compiled_bf16_step_with_attention_dropout_compiles_and_equals_eager_without_dropout():
    """torch.func's backward of bf16 autocast + dropout in scaled_dot_product_attention fails inside
    dynamo ("expected scalar type BFloat16 but found Float"); the compiled step differentiates with
    torch.autograd.grad, which traces. Without dropout the compiled step equals the eager one."""
    torch.manual_seed(0)
    batch = (torch.randn(8, 5, 16), torch.randint(0, 4, (8,)))
    for dropout in (0.1, 0.0):
        model, tx = Attention(dropout), ft.adamw(lr=1e-2)
        state = ft.TrainState.create(model, tx)
        step = ft.make_train_step(model, classification, tx, compile={"backend": "eager"}, precision="bf16")
        new, metrics = step(state, batch)
        with torch.compiler.set_stance("fail_on_recompile"):
            new, metrics = step(new, batch)
        assert torch.isfinite(metrics["loss"]) and not torch.equal(new.params["qkv.weight"], state.params["qkv.weight"])
    eager, _ = run_steps(ft.make_train_step(model, classification, tx, precision="bf16"), state, [batch, batch])
    assert_trees_equal(new.params, eager.params, rtol=1e-5)  # dynamo decomposes some ops: float rounding


@pytest.mark.slow
def test_a_compiled_step_vmapped_by_the_caller_equals_the_vmapped_eager_step():
    """Inside torch.func.vmap the compiled step differentiates with torch.func (autograd.grad on
    detached leaves would not see the batching) and skips its first-call check, which cannot run there."""
    model, tx = mlp(batchnorm=False), ft.sgd(lr=0.1, momentum=0.9)
    states = ft.stack_states([ft.TrainState.create(mlp(batchnorm=False, seed=i), tx) for i in range(3)])
    data = batches(3)
    eager, _ = run_steps(
        torch.func.vmap(ft.make_train_step(model, classification, tx), in_dims=(0, None)), states, data
    )
    compiled = ft.make_train_step(model, classification, tx, compile={"backend": "eager"})
    got, _ = run_steps(torch.func.vmap(compiled, in_dims=(0, None)), states, data)
    assert_trees_equal(got.params, eager.params, rtol=1e-12)


def test_more_compiled_steps_than_dynamos_recompile_limit_in_one_process():
    """Dynamo keeps at most ``recompile_limit`` (8) graphs per code object; each built step has its
    own, so a sweep over many models (here 10 architectures) never hits the limit."""
    tx = ft.sgd(lr=0.1)
    assert torch._dynamo.config.recompile_limit < 10
    for depth in range(1, 11):
        model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(depth)])
        step = ft.make_train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), tx, compile={"backend": "eager"})
        state = ft.TrainState.create(model, tx)
        batch = (torch.randn(4, 3), torch.randn(4, 3))
        new_state, metrics = step(state, batch)
        expected = F.mse_loss(model(batch[0]), batch[1])
        torch.testing.assert_close(metrics["loss"], expected.detach())


@pytest.mark.slow
def test_compiled_inplace_step_writes_into_the_state():
    model = mlp(torch.float32, batchnorm=False)
    tx = ft.adamw(lr=1e-2)
    data = batches(3, dtype=torch.float32)
    pure, _ = run_steps(ft.make_train_step(model, classification, tx), ft.TrainState.create(model, tx), data)
    state = snapshot(ft.TrainState.create(model, tx))
    pointers = [t.data_ptr() for t in _tree.leaves(state)]
    step = ft.make_train_step(model, classification, tx, compile=True, inplace=True)
    state, _ = run_steps(step, state, data)
    assert [t.data_ptr() for t in _tree.leaves(state)] == pointers
    assert_trees_equal(state.params, pure.params, rtol=1e-5)


# ----------------------------------------------------------------------------- review findings


def test_frozen_parameters_are_not_trained_and_hold_no_optimiser_state():
    """requires_grad=False: torch.optim skips the parameter (its .grad is None); so does the step."""
    data = batches(4)
    model = mlp(batchnorm=False)
    model[0].weight.requires_grad_(False)
    tx = ft.adamw(lr=1e-2, weight_decay=0.1)
    state = ft.TrainState.create(model, tx)
    assert "0.weight" not in state.params and "0.weight" in state.buffers
    assert "0.weight" not in state.opt_state.inner_state[0].mu
    state, _ = run_steps(ft.make_train_step(model, classification, tx), state, data)
    reference = mlp(batchnorm=False)
    reference[0].weight.requires_grad_(False)
    params, _ = run_torch(reference, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), data)
    assert torch.equal(state.buffers["0.weight"], params["0.weight"].detach())
    expected = {k: v.detach() for k, v in params.items() if v.requires_grad}
    assert_trees_equal(state.params, expected, rtol=1e-10)


def test_a_nested_loss_scaler_is_found_and_used():
    model = mlp(batchnorm=False)
    plain = ft.chain(ft.clip_by_global_norm(1.0), ft.sgd(lr=0.1))
    # The scaler must see the gradients first (a clip before it would clip scaled gradients), but
    # it may sit inside other wrappers: here apply_if_finite.
    nested = ft.apply_if_finite(ft.dynamic_loss_scale(plain, init_scale=1024.0), max_consecutive_errors=3)
    data = batches(3)
    expected, _ = run_steps(ft.make_train_step(model, classification, plain), ft.TrainState.create(model, plain), data)
    scaled, metrics = run_steps(
        ft.make_train_step(model, classification, nested), ft.TrainState.create(model, nested), data
    )
    assert metrics["loss_scale"].item() == 1024.0
    assert_trees_equal(scaled.params, expected.params, rtol=1e-12)


def test_loss_scale_skips_a_step_whose_inner_updates_overflow():
    """Data parallel: another rank's overflow reaches this rank through the all-reduce, after the
    local gradients were found finite; the step must still be skipped and the scale backed off."""
    poisoned = ft.GradientTransformation(
        lambda p: ft.EmptyState(), lambda u, s, p=None, **e: ({k: v + float("inf") for k, v in u.items()}, s)
    )
    tx = ft.dynamic_loss_scale(ft.chain(poisoned, ft.sgd(lr=0.1)), init_scale=8.0)
    params = {"w": torch.zeros(2)}
    updates, state = tx.update({"w": torch.ones(2)}, tx.init(params), params)
    assert torch.equal(updates["w"], torch.zeros(2)) and state.scale.item() == 4.0


def test_fp16_gradients_are_unscaled_in_float32():
    """1/S underflows in fp16 for S >= 2**25; the unscale must not zero every update."""
    tx = ft.dynamic_loss_scale(ft.sgd(lr=1.0), init_scale=2.0**25)
    params = {"w": torch.zeros(2, dtype=torch.float16)}
    grads = {"w": torch.full((2,), 2.0**15, dtype=torch.float16)}  # a true gradient of 2**-10
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = torch.full((2,), -(2.0**-10), dtype=torch.float16)
    assert updates["w"].dtype == torch.float16 and torch.equal(updates["w"], expected)


def test_integer_metrics_are_averaged_over_microbatches():
    model = mlp(batchnorm=False)
    tx = ft.sgd(lr=0.1)

    def counting(model, batch):
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits, y), {"correct": (logits.argmax(-1) == y).sum()}

    state = ft.TrainState.create(model, tx)
    _, whole = ft.make_train_step(model, counting, tx)(state, batches(1)[0])
    _, parts = ft.make_train_step(model, counting, tx, microbatches=2)(state, batches(1)[0])
    assert parts["correct"].item() == whole["correct"].item() / 2


def test_a_users_own_exception_class_reaches_them_unchanged():
    class BadShape(ValueError):
        def __init__(self, got, want):
            super().__init__(f"got {got}, want {want}")

    def strict(model, batch):
        raise BadShape(batch[0].shape[1], 7)

    model, tx = mlp(batchnorm=False), ft.sgd(lr=0.1)
    with pytest.raises(BadShape, match="got 6, want 7"):
        ft.make_train_step(model, strict, tx)(ft.TrainState.create(model, tx), batches(1)[0])


def test_eager_autograd_gradients_equal_the_functorch_path(monkeypatch):
    """Plain eager steps take gradients with torch.autograd.grad (less per-op overhead); under
    compile, vmap or grad they come from torch.func.grad_and_value. Both give the same step."""
    model = mlp()
    tx = ft.adamw(lr=1e-2)
    data = batches(4)
    fast, fast_metrics = run_steps(ft.make_train_step(model, classification, tx), ft.TrainState.create(model, tx), data)
    monkeypatch.setattr(_tree, "fast_path_ok", lambda leaves: False)
    slow, slow_metrics = run_steps(ft.make_train_step(model, classification, tx), ft.TrainState.create(model, tx), data)
    assert_trees_equal(fast, slow, rtol=1e-12)
    torch.testing.assert_close(fast_metrics, slow_metrics, rtol=1e-12, atol=0)


class TiedLM(nn.Module):
    """An embedding and an output layer sharing one weight, as GPT-2 ties them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 8, dtype=torch.float64)
        self.mix = nn.Linear(8, 8, dtype=torch.float64)
        self.head = nn.Linear(8, 11, bias=False, dtype=torch.float64)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_tied_weights_train_as_one_tensor_like_torch(compile):
    """The state holds the tied weight once; the step's gradient for it sums both uses, as backward does."""

    def lm_loss(model, tokens):
        return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())

    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 11, (4, 6), generator=g) for _ in range(3)]
    model = TiedLM()
    tx = ft.adamw(lr=1e-2, weight_decay=0.1)
    state = ft.TrainState.create(model, tx)
    assert sorted(state.params) == ["embed.weight", "mix.bias", "mix.weight"]
    state, _ = run_steps(ft.make_train_step(model, lm_loss, tx, compile=compile), state, data)
    make_opt = lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)  # noqa: E731
    expected, _ = run_torch(TiedLM(), make_opt, [(t, None) for t in data], loss=lambda m, b: (lm_loss(m, b[0]), {}))
    assert_trees_equal(state.params, expected, rtol=1e-12 if compile else 0.0)


@pytest.mark.slow
def test_a_guard_filter_fn_in_the_compile_options_reaches_the_form_that_plain_calls_run():
    """torch.compile pops ``guard_filter_fn`` from the nested ``options`` dict it is given; a step compiles two
    forms (and ft.vmap a third) with the same options, so each gets its own copy of that dict."""
    seen = []

    def keep_all(entries):
        seen.append(len(entries))
        return [True] * len(entries)

    options = {"options": {"guard_filter_fn": keep_all}}
    model, tx = nn.Linear(3, 1), ft.sgd(0.1)
    step = ft.make_train_step(model, lambda m, b: m(b).pow(2).mean(), tx, compile=options)
    step(ft.TrainState.create(model, tx), torch.randn(4, 3))
    assert seen, "the guard filter was never called"
    assert options == {"options": {"guard_filter_fn": keep_all}}  # the caller's dict is left as it was
