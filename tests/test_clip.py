"""clip, clip_by_global_norm and global_norm against torch.nn.utils, on both the foreach and per-leaf paths."""

from __future__ import annotations

import io
import math

import pytest
import torch

import functrain as ft
from functrain import _tree

from .harness import gradient, make_params, relative_error


@pytest.fixture(params=["foreach", "per_leaf"])
def path(request, monkeypatch):
    """Runs a test on the multi-tensor path and again with it switched off (the per-leaf reference form)."""
    if request.param == "per_leaf":
        monkeypatch.setattr(_tree, "fast_path_ok", lambda leaves: False)
    return request.param


def mixed_grads(seed=0):
    """Leaves of several dtypes, a 0-d one among them, in an order that interleaves the dtypes."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g),
        "d": torch.randn(5, generator=g, dtype=torch.float64),
        "s": torch.randn((), generator=g),
        "h": torch.randn(3, 2, generator=g).bfloat16(),
        "v": 3 * torch.randn(7, generator=g),
    }


def as_param_grads(grads):
    """Parameters whose ``.grad`` are copies of ``grads``, for the torch.nn.utils reference."""
    params = []
    for g in grads.values():
        p = torch.zeros_like(g, requires_grad=True)
        p.grad = g.clone()
        params.append(p)
    return params


def assert_trees_equal(actual, expected):
    assert list(actual) == list(expected)
    for k in expected:
        assert actual[k].dtype == expected[k].dtype, k
        assert torch.equal(actual[k], expected[k]), k


@pytest.mark.parametrize("max_delta", [0.0, 0.3, 1.0, 100.0])
def test_clip_equals_clip_grad_value(path, max_delta):
    grads = mixed_grads()
    params = as_param_grads(grads)
    torch.nn.utils.clip_grad_value_(params, max_delta)
    tx = ft.clip(max_delta)
    updates, state = tx.update(grads, tx.init(grads))
    assert_trees_equal(updates, {k: p.grad for k, p in zip(grads, params)})
    assert state == ft.EmptyState()


def test_clip_with_a_tensor_bound_equals_the_float_bound():
    grads = mixed_grads()
    tx_float, tx_tensor = ft.clip(0.3), ft.clip(torch.tensor(0.3, dtype=torch.float64))
    assert_trees_equal(tx_tensor.update(grads, ())[0], tx_float.update(grads, ())[0])


def test_clip_keeps_nan_as_torch_does(path):
    grads = {"a": torch.tensor([float("nan"), 5.0, -5.0])}
    params = as_param_grads(grads)
    torch.nn.utils.clip_grad_value_(params, 1.0)
    out = ft.clip(1.0).update(grads, ())[0]["a"]
    assert torch.isnan(out[0]) and torch.isnan(params[0].grad[0])
    assert torch.equal(out[1:], params[0].grad[1:])


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.5, "inf"])
def test_global_norm_equals_torch_total_norm(path, norm_type):
    grads = mixed_grads()
    expected = torch.nn.utils.get_total_norm(list(grads.values()), norm_type)
    actual = ft.transforms.global_norm(grads, norm_type)
    assert actual.dtype == expected.dtype == torch.float64  # the per-dtype norms are stacked and promoted
    assert torch.equal(actual, expected)


def test_global_norm_of_one_dtype_keeps_it_and_of_nothing_is_zero():
    grads = {k: v.bfloat16() for k, v in mixed_grads().items()}
    actual = ft.transforms.global_norm(grads)
    assert actual.dtype == torch.bfloat16
    assert torch.equal(actual, torch.nn.utils.get_total_norm(list(grads.values())))
    assert torch.equal(ft.transforms.global_norm({}), torch.nn.utils.get_total_norm([]))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.5])
@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e3])  # clipped to zero, clipped, and the coefficient clamped to 1
def test_clip_by_global_norm_equals_clip_grad_norm(path, norm_type, max_norm):
    grads = mixed_grads()
    params = as_param_grads(grads)
    torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    tx = ft.clip_by_global_norm(max_norm, norm_type)
    updates, state = tx.update(grads, tx.init(grads))
    assert_trees_equal(updates, {k: p.grad for k, p in zip(grads, params)})
    assert state == ft.EmptyState()
    assert all(updates[k] is not grads[k] for k in grads)  # the inputs are left alone


def test_clip_by_global_norm_leaves_an_empty_tree_alone():
    assert ft.clip_by_global_norm(1.0).update({}, ft.EmptyState()) == ({}, ft.EmptyState())


def test_a_tensor_max_norm_and_an_injected_one_equal_the_float(path):
    grads = mixed_grads()
    expected = ft.clip_by_global_norm(0.5).update(grads, ())[0]
    for tx in (
        ft.clip_by_global_norm(torch.tensor(0.5, dtype=torch.float64)),
        ft.inject_hyperparams(ft.clip_by_global_norm)(max_norm=0.5),
    ):
        updates, _ = tx.update(grads, tx.init(grads))
        assert relative_error(updates, expected) <= 1e-6  # bf16 leaves: the coefficient may round differently


def test_adamw_after_clipping_follows_torch():
    """The training loop everyone writes: backward, clip_grad_norm_, AdamW.step(), step for step."""
    params = make_params()
    lr, max_norm = 0.05, 0.5
    tx = ft.chain(ft.clip_by_global_norm(max_norm), ft.adamw(lr=lr, weight_decay=0.1))
    state, ours = tx.init(params), params
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.AdamW(list(tensors.values()), lr=lr, weight_decay=0.1)
    norms = []
    for t in range(15):
        grads = gradient(ours, t)
        norms.append(ft.transforms.global_norm(grads))
        updates, state = tx.update(grads, state, ours)
        ours = ft.apply_updates(ours, updates)

        reference_grads = gradient({k: v.detach() for k, v in tensors.items()}, t)
        for k, v in tensors.items():
            v.grad = reference_grads[k].clone()
        total = torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_norm)
        opt.step()
        assert torch.allclose(norms[-1], total, rtol=1e-12, atol=0)
    assert any(n > max_norm for n in norms)  # clipping was active
    assert relative_error(ours, {k: v.detach() for k, v in tensors.items()}) <= 1e-7


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ft.clip(-0.1), r"clip: max_delta must be >= 0"),
        (lambda: ft.clip_by_global_norm(-1.0), r"clip_by_global_norm: max_norm must be >= 0"),
        (lambda: ft.clip_by_global_norm(1.0, 0.0), r"clip_by_global_norm: norm_type must be > 0"),
        (lambda: ft.clip_by_global_norm(1.0, -2.0), r"clip_by_global_norm: norm_type must be > 0"),
        (lambda: ft.clip_by_global_norm(1.0, float("nan")), r"norm_type must be > 0"),
        (lambda: ft.clip_by_global_norm(1.0, "two"), r"norm_type must be a number > 0 or 'inf'"),
        (lambda: ft.transforms.global_norm({}, 0), r"global_norm: norm_type must be > 0"),
    ],
)
def test_bad_arguments_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_a_tensor_norm_type_is_a_type_error():
    with pytest.raises(TypeError, match="norm_type must be a Python number"):
        ft.clip_by_global_norm(1.0, torch.tensor(2.0))


def test_stateless_clipping_round_trips_a_checkpoint():
    tx = ft.named_chain(clip=ft.clip_by_global_norm(1.0), value=ft.clip(0.1), adam=ft.adam(lr=0.1))
    state = tx.init(make_params())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["clip"] == ft.EmptyState() and loaded["value"] == ft.EmptyState()


# ----------------------------------------------------------------------------- compiled


def no_decay(name, tensor):
    return tensor.ndim >= 2


@pytest.fixture(scope="module")
def compiled_clip_masked_step():
    """One compiled update shared by the compile tests of this module (compiling is the slow part)."""
    torch._dynamo.reset()
    tx = ft.chain(
        ft.clip_by_global_norm(1.0),
        ft.masked(ft.adamw(lr=0.05, weight_decay=0.0), no_decay),
        ft.transforms.add_decayed_weights(0.1, mask=no_decay),
    )

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return ft.apply_updates(params, updates), state

    return tx, step, torch.compile(step, fullgraph=True)


@pytest.mark.slow
def test_clip_masked_and_masked_decay_compile_once_and_equal_eager(compiled_clip_masked_step):
    tx, step, compiled = compiled_clip_masked_step
    params = make_params(torch.float32)
    eager = (params, tx.init(params))
    state = tx.init(params)
    params, state = compiled(params, state, gradient(params, 0))
    eager = step(*eager, gradient(eager[0], 0))
    with torch.compiler.set_stance("fail_on_recompile"):
        for t in range(1, 5):
            params, state = compiled(params, state, gradient(params, t))
            eager = step(*eager, gradient(eager[0], t))
    assert relative_error(params, eager[0]) <= 1e-5
    assert relative_error(state[1].inner_state.inner_state[0].mu, eager[1][1].inner_state.inner_state[0].mu) <= 1e-5
    assert sorted(state[1].inner_state.inner_state[0].mu) == ["t", "w"]  # adamw: moments for the masked leaves only


@pytest.mark.parametrize("factory", [ft.clip, ft.clip_by_global_norm], ids=["clip", "clip_by_global_norm"])
def test_a_schedule_is_refused_by_the_factory_and_works_through_inject_hyperparams(factory):
    schedule = lambda count: (count + 1).to(torch.float64)  # noqa: E731
    with pytest.raises(TypeError, match="float or a 0-d tensor.*inject_hyperparams"):
        factory(schedule)
    tx = ft.inject_hyperparams(factory)(schedule)
    state = tx.init({"w": torch.ones(1)})
    for bound in [1.0, 2.0, 3.0]:
        updates, state = tx.update({"w": torch.full((1,), 10.0)}, state)
        expected, _ = factory(bound).update({"w": torch.full((1,), 10.0)}, ft.EmptyState())
        assert torch.equal(updates["w"], expected["w"])
