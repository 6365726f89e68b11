"""ft.lbfgs against torch.optim.LBFGS (torch's own, the reference), closure-free.

lbfgs needs ``value_fn`` (a loss to re-evaluate), which the common battery's synthetic gradients do
not have, so it is not in tests/registry.py. This file covers the battery's points that apply to it:
parity in float64 and float32 (both line-search modes, options that wrap the history, stop early
and limit evaluations; the state itself compared with torch's), tensor and scheduled ``lr``,
``maximize``, state structure and dtypes kept, empty and nested trees, checkpoint round trip, bad
hyperparameters, mismatched trees, complex params refused, the update == update_and_apply, the
traced (masked) path == the eager one, make_train_step == torch with a closure, compiled == eager
with one graph and no recompile, and a PINN trained as torch trains it.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch._dynamo.utils import counters

import functrain as ft
from functrain import _tree

F64, F32 = torch.float64, torch.float32
LINE_SEARCHES = [None, "strong_wolfe"]


@pytest.fixture(autouse=True)
def one_thread():
    """Every tensor here is tiny: one thread, so a loaded 2-core machine does not spend a 4 ms
    evaluation (L-BFGS makes hundreds) waiting on a second thread (measured: 280 ms with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- problems


def quadratic(p):
    """An ill-conditioned quadratic with a coupling term."""
    w, b = p["w"].reshape(-1), p["b"]
    scales = torch.arange(1.0, 1.0 + w.numel(), dtype=w.dtype) ** 2
    return 0.5 * (scales * w**2).sum() + (w[:2].sum() - b[0]) ** 2 + (b - 1).pow(2).sum()


def rosenbrock(p):
    x = p["x"]
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


_X = torch.randn(48, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
_Y = torch.sin(_X.sum(1, keepdim=True))


def mlp(p):
    """A small MLP regression, written on the params so torch and functrain run the same code."""
    x, y = _X.to(p["w1"].dtype), _Y.to(p["w1"].dtype)
    h = torch.tanh(x @ p["w1"] + p["b1"])
    return ((h @ p["w2"] + p["b2"] - y) ** 2).mean()


def start(problem, dtype):
    if problem is quadratic:
        return {"w": torch.linspace(-1, 1, 6, dtype=dtype).reshape(3, 2) + 2, "b": torch.zeros(2, dtype=dtype)}
    if problem is rosenbrock:
        return {"x": torch.tensor([-1.2, 1.0, -0.5, 0.8], dtype=dtype)}
    g = torch.Generator().manual_seed(1)
    return {
        "w1": torch.randn(3, 8, generator=g, dtype=dtype),
        "b1": torch.zeros(8, dtype=dtype),
        "w2": 0.5 * torch.randn(8, 1, generator=g, dtype=dtype),
        "b2": torch.zeros(1, dtype=dtype),
    }


# The options exercise: defaults; a history of 2 that wraps; max_eval limiting the iterations;
# tolerances loose enough to stop early (grad, change); lr below 1.
OPTIONS = {
    "defaults": {},
    "wrapping-history": {"history_size": 2, "max_iter": 7},
    "max-eval": {"max_iter": 10, "max_eval": 4},
    "tolerances": {"tolerance_grad": 1e-3, "tolerance_change": 1e-4},
    "small-lr": {"lr": 0.3, "max_iter": 5, "history_size": 3},
}


# ----------------------------------------------------------------------------- runners


def value_fn_of(loss_fn):
    grad_and_value = torch.func.grad_and_value(loss_fn)

    def value_fn(params):
        grads, loss = grad_and_value(params)
        return loss, grads

    return value_fn


def run_ft(tx, loss_fn, params, steps):
    """``steps`` updates, each from the loss and gradient at the current params (as a training step);
    returns the params after each, the losses each started from, and the last state."""
    value_fn = value_fn_of(loss_fn)
    state, trajectory, losses = tx.init(params), [], []
    for _ in range(steps):
        loss, grads = value_fn(params)
        params, state = ft.update_and_apply(tx, grads, state, params, value=loss, value_fn=value_fn)
        trajectory.append(params)
        losses.append(loss)
    return trajectory, losses, state


def run_torch(loss_fn, params, steps, **options):
    leaves, spec = pytree.tree_flatten(params)
    leaves = [leaf.clone().requires_grad_() for leaf in leaves]
    opt = torch.optim.LBFGS(leaves, **options)

    def closure():
        opt.zero_grad()
        loss = loss_fn(pytree.tree_unflatten(leaves, spec))
        loss.backward()
        return loss

    trajectory, losses = [], []
    for _ in range(steps):
        losses.append(opt.step(closure).detach())
        trajectory.append(pytree.tree_unflatten([leaf.detach().clone() for leaf in leaves], spec))
    return trajectory, losses, opt


def relative_error(ours, theirs) -> float:
    worst = 0.0
    for a, b in zip(pytree.tree_leaves(ours), pytree.tree_leaves(theirs)):
        worst = max(worst, float(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).detach()))
    return worst


def assert_state_is_torchs(memory: ft.optimisers.LbfgsMemory, opt: torch.optim.LBFGS, rtol: float) -> None:
    """Every quantity torch keeps between steps, the history in torch's order (oldest first)."""
    torch_state = opt.state[opt._params[0]]
    assert int(memory.func_evals) == torch_state["func_evals"]
    assert int(memory.n_iter) == torch_state["n_iter"]
    close = {"rtol": rtol, "atol": 0.0}
    torch.testing.assert_close(memory.d, torch_state["d"], **close)
    torch.testing.assert_close(memory.t, torch.as_tensor(torch_state["t"], dtype=F64), **close)
    torch.testing.assert_close(memory.prev_flat_grad, torch_state["prev_flat_grad"], **close)
    torch.testing.assert_close(memory.prev_loss, torch.as_tensor(torch_state["prev_loss"], dtype=F64), **close)
    torch.testing.assert_close(
        memory.H_diag, torch.as_tensor(torch_state["H_diag"], dtype=memory.H_diag.dtype), **close
    )
    stored = len(torch_state["old_dirs"])
    assert int(memory.num_old) == stored
    order = (int(memory.start) + torch.arange(stored)) % memory.ro.shape[0]
    if stored:
        torch.testing.assert_close(memory.old_dirs[order], torch.stack(torch_state["old_dirs"]), **close)
        torch.testing.assert_close(memory.old_stps[order], torch.stack(torch_state["old_stps"]), **close)
        torch.testing.assert_close(memory.ro[order], torch.stack(torch_state["ro"]), **close)


# ----------------------------------------------------------------------------- parity


def test_signature_mirrors_torch_lbfgs():
    """Same keyword names, order and defaults as torch.optim.LBFGS (minus params)."""
    theirs = [
        (p.name, p.default, p.kind)
        for p in inspect.signature(torch.optim.LBFGS.__init__).parameters.values()
        if p.name not in ("self", "params")
    ]
    ours = [(p.name, p.default, p.kind) for p in inspect.signature(ft.lbfgs).parameters.values()]
    assert ours == theirs


# Measured on this code: equal bit for bit (every operation is torch's, in torch's dtypes); the
# tolerances leave room for a BLAS that sums a dot product in another order.
RTOL = {F64: 1e-12, F32: 1e-5}


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
@pytest.mark.parametrize("options", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("problem", [quadratic, rosenbrock], ids=["quadratic", "rosenbrock"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_equals_torch_lbfgs(problem, dtype, options, line_search_fn):
    kwargs = {**OPTIONS[options], "line_search_fn": line_search_fn}
    ours, our_losses, state = run_ft(ft.lbfgs(**kwargs), problem, start(problem, dtype), steps=3)
    theirs, their_losses, opt = run_torch(problem, start(problem, dtype), steps=3, **kwargs)
    for a, b in zip(ours, theirs):
        assert relative_error(a, b) <= RTOL[dtype]
        assert all(t.dtype == dtype for t in a.values())
    torch.testing.assert_close(torch.stack(our_losses), torch.stack(their_losses), rtol=RTOL[dtype], atol=0.0)
    assert_state_is_torchs(state.inner_state, opt, RTOL[dtype])
    # The run did what the options say: torch's counters are compared above; here, that it moved.
    assert relative_error(ours[-1], start(problem, dtype)) > 1e-3


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
@pytest.mark.parametrize(
    ("dtype", "options"),
    [(F64, "defaults"), (F64, "wrapping-history"), (F64, "max-eval"), (F32, "tolerances")],
)
def test_mlp_equals_torch_lbfgs(dtype, options, line_search_fn):
    kwargs = {**OPTIONS[options], "line_search_fn": line_search_fn}
    ours, _, state = run_ft(ft.lbfgs(**kwargs), mlp, start(mlp, dtype), steps=2)
    theirs, _, opt = run_torch(mlp, start(mlp, dtype), steps=2, **kwargs)
    for a, b in zip(ours, theirs):
        assert relative_error(a, b) <= RTOL[dtype]
    assert_state_is_torchs(state.inner_state, opt, RTOL[dtype])


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_maximize_equals_torch(line_search_fn):
    def negated(p):
        return -rosenbrock(p)

    kwargs = {"maximize": True, "line_search_fn": line_search_fn, "max_iter": 6}
    ours, _, state = run_ft(ft.lbfgs(**kwargs), negated, start(rosenbrock, F64), steps=2)
    theirs, _, opt = run_torch(negated, start(rosenbrock, F64), steps=2, **kwargs)
    assert relative_error(ours[-1], theirs[-1]) <= 1e-12
    assert_state_is_torchs(state.inner_state, opt, 1e-12)


def test_nested_tree_equals_torch():
    """Leaves in the tree's order are torch's params order: a nested tree flattens as torch's list."""

    def loss_fn(p):
        flat = {"w": torch.cat([p["layers"][0].reshape(-1), p["layers"][1]["v"]]).reshape(3, 2), "b": p["bias"]}
        return quadratic(flat)

    params = {
        "layers": [torch.ones(2, 2, dtype=F64), {"v": torch.full((2,), 0.5, dtype=F64)}],
        "bias": torch.zeros(2, dtype=F64),
    }
    kwargs = {"line_search_fn": "strong_wolfe", "history_size": 3}
    ours, _, state = run_ft(ft.lbfgs(**kwargs), loss_fn, params, steps=2)
    theirs, _, opt = run_torch(loss_fn, params, steps=2, **kwargs)
    assert pytree.tree_structure(ours[-1]) == pytree.tree_structure(params)
    assert relative_error(ours[-1], theirs[-1]) <= 1e-12
    assert_state_is_torchs(state.inner_state, opt, 1e-12)


@pytest.mark.parametrize("lr", ["tensor", "schedule"])
def test_tensor_and_scheduled_lr_equal_torch(lr):
    """lr as a 0-d tensor, and as a schedule: torch with its param group's lr set before each step."""
    values = [0.5, 0.25, 0.125]
    if lr == "tensor":
        tx, values = ft.lbfgs(lr=torch.tensor(0.5, dtype=F64), max_iter=5), [0.5] * 3
    else:
        tx = ft.lbfgs(lr=ft.schedules.exponential_lr(0.5, gamma=0.5), max_iter=5)
    params = start(quadratic, F64)
    ours, _, _ = run_ft(tx, quadratic, params, steps=3)
    leaves = [v.clone().requires_grad_() for v in params.values()]
    opt = torch.optim.LBFGS(leaves, lr=values[0], max_iter=5)

    def closure():
        opt.zero_grad()
        loss = quadratic(dict(zip(params, leaves)))
        loss.backward()
        return loss

    for k, value in enumerate(values):
        opt.param_groups[0]["lr"] = value
        opt.step(closure)
        assert relative_error(ours[k], dict(zip(params, [leaf.detach() for leaf in leaves]))) <= 1e-12


# ----------------------------------------------------------------------------- execution paths


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_update_is_update_and_apply_to_rounding(line_search_fn):
    """``update`` returns the step as updates (new - old); ``update_and_apply`` the new params
    themselves, torch's numbers. Adding the updates back rounds, no more."""
    tx = ft.lbfgs(line_search_fn=line_search_fn, max_iter=5)
    params = start(rosenbrock, F64)
    value_fn = value_fn_of(rosenbrock)
    loss, grads = value_fn(params)
    state = tx.init(params)
    updates, via_update = tx.update(grads, state, params, value=loss, value_fn=value_fn)
    new_params, via_apply = tx.update_and_apply(grads, state, params, value=loss, value_fn=value_fn)
    torch.testing.assert_close(ft.apply_updates(params, updates), new_params, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(via_update, via_apply, rtol=0, atol=0)
    assert not torch.equal(new_params["x"], params["x"])


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_masked_path_equals_eager(monkeypatch, line_search_fn):
    """Traced (vmap; compiled with while_loop) there is no early exit: every step runs under a mask.
    That path, forced here in eager mode, gives the eager path's numbers exactly."""
    kwargs = {"line_search_fn": line_search_fn, "max_iter": 6, "history_size": 2, "tolerance_change": 1e-5}
    eager, _, eager_state = run_ft(ft.lbfgs(**kwargs), rosenbrock, start(rosenbrock, F64), steps=3)
    tx = ft.lbfgs(**kwargs)
    monkeypatch.setattr(_tree, "tracing", lambda: True)
    masked, _, masked_state = run_ft(tx, rosenbrock, start(rosenbrock, F64), steps=3)
    for a, b in zip(masked, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(masked_state, eager_state, rtol=0, atol=0)


class MLP(torch.nn.Module):
    def __init__(self, dtype=F64, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)).to(dtype)

    def forward(self, x):
        return self.net(x)


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def torch_closure_run(model, loss_fn, batch, steps, **options):
    opt = torch.optim.LBFGS(model.parameters(), **options)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    return [opt.step(closure).detach() for _ in range(steps)]


@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace"])
@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_make_train_step_equals_torch_with_a_closure(line_search_fn, inplace):
    """make_train_step passes value and value_fn: the step is torch's step(closure), its "loss"
    metric the closure's first loss (what torch's step returns)."""
    options = {"line_search_fn": line_search_fn, "max_iter": 8, "history_size": 4}
    batch = (_X, _Y)
    model = MLP()
    tx = ft.lbfgs(**options)
    step = ft.make_train_step(model, mse, tx, inplace=inplace)
    state = ft.TrainState.create(model, tx)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    reference = MLP()
    their_losses = torch_closure_run(reference, mse, batch, 3, **options)
    torch.testing.assert_close(torch.stack(losses), torch.stack(their_losses), rtol=1e-12, atol=0)
    assert relative_error(state.params, dict(reference.named_parameters())) <= 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_compiled_step_equals_eager_in_one_graph_without_recompiles(line_search_fn):
    """compile=True: one graph (every data-dependent exit masked), equal to eager to rounding, and
    no recompile over later steps (the history fills and wraps, searches take other paths)."""
    # Small budgets: the graph holds every evaluation they allow (3 with the search, 1 without).
    options = {"line_search_fn": line_search_fn, "max_iter": 2, "max_eval": 3, "history_size": 2}
    model, batch = MLP(width=4), (_X[:16], _Y[:16])
    tx = ft.lbfgs(**options)
    eager = ft.make_train_step(model, mse, tx)
    compiled = ft.make_train_step(model, mse, tx, compile=True)
    ours = theirs = ft.TrainState.create(model, tx)
    torch._dynamo.reset()
    counters.clear()
    for k in range(4):
        theirs, their_metrics = eager(theirs, batch)
        with contextlib.nullcontext() if k == 0 else torch.compiler.set_stance("fail_on_recompile"):
            ours, metrics = compiled(ours, batch)
        torch.testing.assert_close(metrics["loss"], their_metrics["loss"], rtol=1e-9, atol=0)
        assert relative_error(ours.params, theirs.params) <= 1e-9
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    memory, their_memory = ours.opt_state.inner_state, theirs.opt_state.inner_state
    assert int(memory.func_evals) == int(their_memory.func_evals) and int(memory.n_iter) == int(their_memory.n_iter)
    assert int(memory.num_old) == 2  # the history wrapped inside the graph


def test_pinn_poisson_equals_torch_and_the_analytic_solution():
    """A physics-informed network for u'' = -pi^2 sin(pi x) on [0, 1], u(0) = u(1) = 0 (solution
    sin(pi x)): the loss differentiates the network twice with respect to its input (torch.func).
    ft.lbfgs through make_train_step reaches torch.optim.LBFGS's loss with a closure, and the
    analytic solution."""
    x = torch.linspace(0, 1, 24, dtype=F64)[1:-1].reshape(-1, 1)
    edges = torch.tensor([[0.0], [1.0]], dtype=F64)

    def pinn_loss(model, batch):
        inside, ends = batch

        def u(xi):
            return model(xi.reshape(1, 1)).reshape(())

        u_xx = torch.func.vmap(torch.func.grad(torch.func.grad(u)))(inside.reshape(-1))
        residual = u_xx + math.pi**2 * torch.sin(math.pi * inside.reshape(-1))
        return residual.pow(2).mean() + model(ends).pow(2).mean()

    def network():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(1, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)
        ).to(F64)

    options = {"line_search_fn": "strong_wolfe", "max_iter": 50, "history_size": 20}
    model = network()
    tx = ft.lbfgs(**options)
    step = ft.make_train_step(model, pinn_loss, tx)
    state = ft.TrainState.create(model, tx)
    for _ in range(6):
        state, metrics = step(state, (x, edges))
    reference = network()
    their_losses = torch_closure_run(reference, pinn_loss, (x, edges), 6, **options)
    torch.testing.assert_close(metrics["loss"], their_losses[-1], rtol=1e-9, atol=0)
    assert relative_error(state.params, dict(reference.named_parameters())) <= 1e-9
    grid = torch.linspace(0, 1, 101, dtype=F64).reshape(-1, 1)
    evaluate = torch.func.functional_call(model, (state.params, state.buffers), (grid,))
    assert float(metrics["loss"]) < 1e-4
    assert float((evaluate - torch.sin(math.pi * grid)).abs().max()) < 1e-2


# ----------------------------------------------------------------------------- state and inputs


def test_checkpoint_round_trip_continues_the_same_run():
    tx = ft.lbfgs(line_search_fn="strong_wolfe", history_size=3, max_iter=4)
    value_fn = value_fn_of(rosenbrock)
    params, state = start(rosenbrock, F64), tx.init(start(rosenbrock, F64))
    for _ in range(2):
        loss, grads = value_fn(params)
        params, state = tx.update_and_apply(grads, state, params, value=loss, value_fn=value_fn)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert type(loaded) is type(state) and type(loaded.inner_state) is ft.optimisers.LbfgsMemory
    torch.testing.assert_close(loaded, state, rtol=0, atol=0)
    loss, grads = value_fn(params)
    after, _ = tx.update_and_apply(grads, state, params, value=loss, value_fn=value_fn)
    after_loaded, _ = tx.update_and_apply(grads, loaded, params, value=loss, value_fn=value_fn)
    torch.testing.assert_close(after_loaded, after, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_state_structure_and_dtypes_are_kept(dtype):
    params = start(mlp, dtype)
    tx = ft.lbfgs(history_size=3, max_iter=4, line_search_fn="strong_wolfe")
    initial = tx.init(params)
    _, _, state = run_ft(tx, mlp, params, steps=2)

    def layout(tree):
        return pytree.tree_map(lambda t: (tuple(t.shape), t.dtype), tree), pytree.tree_structure(tree)

    assert layout(state) == layout(initial)
    n = sum(p.numel() for p in params.values())
    memory = state.inner_state
    assert memory.old_dirs.shape == (3, n) and memory.old_dirs.dtype == dtype and memory.d.dtype == dtype
    assert memory.t.dtype == F64 and memory.n_iter.dtype == torch.int64


def test_empty_tree_changes_nothing():
    tx = ft.lbfgs()
    state = tx.init({})

    def value_fn(params):
        raise AssertionError("nothing to evaluate")

    updates, new_state = tx.update({}, state, {}, value=torch.tensor(1.0), value_fn=value_fn)
    assert updates == {}
    torch.testing.assert_close(new_state.inner_state, state.inner_state, rtol=0, atol=0)  # as torch: no step


def test_update_without_value_fn_says_how_to_run_it():
    tx = ft.lbfgs()
    params = start(quadratic, F64)
    grads = torch.func.grad(quadratic)(params)
    with pytest.raises(ValueError, match="value_fn.*make_train_step"):
        tx.update(grads, tx.init(params), params)
    with pytest.raises(ValueError, match="value_fn"):
        tx.update(grads, tx.init(params), params, value=quadratic(params))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, "lr must be >= 0"),
        ({"max_iter": 0}, ValueError, r"max_iter must be an int >= 1"),
        ({"max_iter": 2.5}, TypeError, r"max_iter must be an int >= 1"),
        ({"max_eval": 0}, ValueError, r"max_eval must be an int >= 1"),
        ({"tolerance_grad": -1e-3}, ValueError, "tolerance_grad must be >= 0"),
        ({"tolerance_change": float("nan")}, ValueError, "tolerance_change must be >= 0"),
        ({"history_size": 0}, ValueError, r"history_size must be an int >= 1"),
        ({"line_search_fn": "armijo"}, ValueError, r"line_search_fn must be one of \(None, 'strong_wolfe'\)"),
        ({"maximize": 1}, TypeError, "maximize must be a bool"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        ft.lbfgs(**kwargs)


def test_mismatched_trees_are_refused():
    tx = ft.lbfgs()
    params = start(quadratic, F64)
    value_fn = value_fn_of(quadratic)
    loss, grads = value_fn(params)
    other = tx.init({"w": torch.zeros(4, 2, dtype=F64), "b": torch.zeros(2, dtype=F64)})
    with pytest.raises(ValueError, match="opt_state"):  # a state built for other params
        tx.update(grads, other, params, value=loss, value_fn=value_fn)
    with pytest.raises(ValueError, match="'w'"):  # gradients of other shapes
        tx.update({"w": grads["w"][:2], "b": grads["b"]}, tx.init(params), params, value=loss, value_fn=value_fn)

    def wrong_value_fn(p):
        return loss, {"w": grads["w"]}

    with pytest.raises(ValueError, match="value_fn returned"):
        tx.update(grads, tx.init(params), params, value=loss, value_fn=wrong_value_fn)
    with pytest.raises(ValueError, match="AdamState"):  # another optimiser's state
        tx.update(grads, ft.adam().init(params), params, value=loss, value_fn=value_fn)


def test_complex_params_are_refused():
    with pytest.raises(TypeError, match="does not support complex parameters"):
        ft.lbfgs().init({"z": torch.zeros(3, dtype=torch.complex128)})


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_vmapped_step_equals_each_models_own(line_search_fn):
    """Under vmap the loop runs masked (no host read), each model deciding its own exits."""
    tx = ft.lbfgs(line_search_fn=line_search_fn, max_iter=4, history_size=2)
    model, batch = MLP(width=4), (_X[:16], _Y[:16])
    step = ft.make_train_step(model, mse, tx)
    initial = ft.TrainState.create(model, tx)
    generator = torch.Generator().manual_seed(0)
    states = [
        initial._replace(
            params={k: torch.randn(p.shape, generator=generator, dtype=F64) for k, p in initial.params.items()}
        )
        for _ in range(2)
    ]
    stacked = ft.stack_states(states)
    vstep = torch.func.vmap(step, in_dims=(0, None), randomness="different")
    for _ in range(2):
        stacked, _ = vstep(stacked, batch)
        states = [step(state, batch)[0] for state in states]
    for i, state in enumerate(states):
        for key, param in state.params.items():
            torch.testing.assert_close(stacked.params[key][i], param, rtol=1e-12, atol=1e-14)
        assert int(stacked.opt_state.inner_state.func_evals[i]) == int(state.opt_state.inner_state.func_evals)
