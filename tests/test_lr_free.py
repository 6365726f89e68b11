"""ft.prodigy and ft.dadapt_adam beyond the common battery: the step-size estimate d, step by step,
and every state tensor against the reference packages' (prodigyopt 1.1.2, dadaptation 3.2); the
packages' skipped steps (no gradient signal, lr 0); beta3 and tensor hyperparameters in every
registry case; a run resumed from a checkpoint mid-run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft

from . import registry
from .harness import gradient, make_params, relative_error
from .specs_lr_free import dadapt_adam_reference, prodigy_reference

STEPS = 25
MAKERS = {"prodigy": (ft.prodigy, prodigy_reference), "dadapt_adam": (ft.dadapt_adam, dadapt_adam_reference)}


def core_state(opt_state):
    """The estimate's state: the last transform of the optimiser's chain."""
    return opt_state.inner_state[-1]


def run_both(name, kwargs, steps=STEPS, grads_at=gradient, lr_at=None, schedule=None, dtype=torch.float64):
    """Steps functrain and the reference side by side on the same gradients; returns the two final
    params, functrain's state, the reference optimiser and the estimate d of each after every step.
    ``lr_at(t)`` sets the reference's group lr before step t, ``schedule`` is the same as a schedule."""
    make, reference = MAKERS[name]
    params = make_params(dtype)
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = reference(list(tensors.values()), **kwargs)
    tx = make(**kwargs) if schedule is None else make(**{**kwargs, "lr": schedule})
    state = tx.init(params)
    ours_d, theirs_d = [], []
    for t in range(steps):
        if lr_at is not None:
            opt.param_groups[0]["lr"] = lr_at(t)
        grads = grads_at(params, t)
        for k, v in tensors.items():
            v.grad = grads[k].clone()
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
        ours_d.append(float(core_state(state).d))
        theirs_d.append(float(opt.param_groups[0]["d"]))
    return params, {k: v.detach() for k, v in tensors.items()}, state, opt, ours_d, theirs_d


def close(a: float, b: float, rtol: float = 1e-12) -> bool:
    return abs(a - b) <= rtol * abs(b)


# ----------------------------------------------------------------------------- the estimate d


@pytest.mark.parametrize("name", MAKERS)
def test_d_grows_from_d0_as_the_references_does_step_by_step(name):
    _, _, _, _, ours, theirs = run_both(name, {})
    assert all(close(a, b) for a, b in zip(ours, theirs)), (ours, theirs)
    assert ours[0] == 1e-6  # the first step has no distance travelled to estimate from
    assert ours == sorted(ours) and ours[-1] > 1e3 * 1e-6  # never shrinks, and it grew by orders of magnitude


@pytest.mark.parametrize("name", MAKERS)
def test_growth_rate_caps_each_steps_growth_as_the_reference(name):
    _, _, _, _, ours, theirs = run_both(name, {"d0": 1e-3, "growth_rate": 1.05})
    assert all(close(a, b) for a, b in zip(ours, theirs))
    # Prodigy's first move away from d0 is to the estimate itself, uncapped (as in the package).
    ratios = [b / a for a, b in zip(ours, ours[1:]) if name == "dadapt_adam" or a != 1e-3]
    assert max(ratios) <= 1.05 * (1 + 1e-15) and max(ratios) > 1.04  # the cap binds


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"weight_decay": 0.1, "use_bias_correction": True}, {"slice_p": 3, "safeguard_warmup": True}],
    ids=["default", "decay_bias_correction", "sliced_safeguard"],
)
def test_prodigy_state_after_n_steps_equals_the_references(kwargs):
    ours_params, theirs_params, state, opt, _, _ = run_both("prodigy", kwargs)
    core = core_state(state)
    group = opt.param_groups[0]
    assert int(core.k) == group["k"] == STEPS
    for field in ("d", "d_max", "d_numerator"):
        assert close(float(getattr(core, field)), group[field]), field
    for i, key in enumerate(ours_params):
        theirs = opt.state[opt.param_groups[0]["params"][i]]
        for ours_t, theirs_t in [
            (core.exp_avg[key], theirs["exp_avg"]),
            (core.exp_avg_sq[key], theirs["exp_avg_sq"]),
            # the package keeps s and p0 flattened (and sliced): ours keep the parameter's shape for slice_p = 1
            (core.s[key].reshape(-1), theirs["s"]),
            (core.p0[key].reshape(-1), theirs["p0"].reshape(-1)),
        ]:
            assert relative_error({"x": ours_t}, {"x": theirs_t}) <= 1e-12, key
    assert relative_error(ours_params, theirs_params) <= 1e-12


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1, "decouple": True, "use_bias_correction": True}])
def test_dadapt_adam_state_after_n_steps_equals_the_references(kwargs):
    ours_params, theirs_params, state, opt, _, _ = run_both("dadapt_adam", kwargs)
    core = core_state(state)
    group = opt.param_groups[0]
    assert int(core.k) == group["k"] == STEPS
    assert close(float(core.d), group["d"]) and close(float(core.numerator_weighted), group["numerator_weighted"])
    for i, key in enumerate(ours_params):
        theirs = opt.state[group["params"][i]]
        for field in ("exp_avg", "exp_avg_sq", "s"):
            assert relative_error({"x": getattr(core, field)[key]}, {"x": theirs[field]}) <= 1e-12, (key, field)
    assert relative_error(ours_params, theirs_params) <= 1e-12


# ----------------------------------------------------------------------------- skipped steps


def zero_at_first(params, t):
    """No gradient signal for the first two steps, then the harness's noisy quadratic."""
    grads = gradient(params, t)
    return {k: torch.zeros_like(g) for k, g in grads.items()} if t < 2 else grads


@pytest.mark.parametrize("name", MAKERS)
def test_a_step_without_gradient_signal_is_skipped_as_the_package_returns_early(name):
    params = make_params()
    make, _ = MAKERS[name]
    tx = make()
    state = tx.init(params)
    updates, state = tx.update(zero_at_first(params, 0), state, params)
    assert all(torch.equal(u, torch.zeros_like(u)) for u in updates.values())
    assert int(core_state(state).k) == 0 and float(core_state(state).d) == 1e-6
    ours, theirs, state, opt, ours_d, theirs_d = run_both(name, {}, grads_at=zero_at_first)
    assert int(core_state(state).k) == opt.param_groups[0]["k"] == STEPS - 2
    assert all(close(a, b) for a, b in zip(ours_d, theirs_d))
    assert relative_error(ours, theirs) <= 1e-12


@pytest.mark.parametrize("name", MAKERS)
def test_lr_schedule_through_zero_equals_the_reference_with_the_group_lr_set(name):
    """lr 0 at the start (a warm-up from 0) and in the middle: the package skips those steps and
    leaves its moments alone; the schedule does the same."""
    lr_at = lambda t: 0.0 if t in (0, 7, 8) else min(1.0, 0.25 * t)  # noqa: E731

    def schedule(count):
        t = count.to(torch.float64)
        return torch.where((t == 0) | (t == 7) | (t == 8), 0.0, torch.clamp(0.25 * t, max=1.0))

    for kwargs in ({}, {"use_bias_correction": True}):
        ours, theirs, state, opt, ours_d, theirs_d = run_both(name, kwargs, lr_at=lr_at, schedule=schedule)
        assert int(core_state(state).k) == opt.param_groups[0]["k"] == STEPS - 3
        assert all(close(a, b) for a, b in zip(ours_d, theirs_d))
        assert relative_error(ours, theirs) <= 1e-12


def test_prodigy_safeguard_warmup_under_a_warmup_schedule_equals_the_reference():
    lr_at = lambda t: min(1.0, (t + 1) / 10)  # noqa: E731
    schedule = lambda count: torch.clamp((count.to(torch.float64) + 1) / 10, max=1.0)  # noqa: E731
    ours, theirs, _, _, ours_d, theirs_d = run_both(
        "prodigy", {"safeguard_warmup": True}, lr_at=lr_at, schedule=schedule
    )
    assert all(close(a, b) for a, b in zip(ours_d, theirs_d))
    assert relative_error(ours, theirs) <= 1e-12


# ----------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta3", [0.9, 0.5])
def test_prodigy_beta3_equals_the_reference(beta3, dtype):
    """beta3 is left out of the registry's cases (see specs_lr_free.py): checked here, as a float and a tensor."""
    kwargs = {"beta3": beta3, "weight_decay": 0.1}
    _, theirs, _, _, ours_d, theirs_d = run_both("prodigy", kwargs, dtype=dtype)
    ours_tensor, _, _, _, _, _ = run_both(
        "prodigy", {**kwargs, "beta3": torch.tensor(beta3, dtype=torch.float64)}, dtype=dtype
    )
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert all(close(a, b, rtol) for a, b in zip(ours_d, theirs_d))
    assert relative_error(ours_tensor, theirs) <= rtol


def _as_tensors(value):
    if isinstance(value, tuple):
        return tuple(_as_tensors(v) for v in value)
    return torch.tensor(float(value), dtype=torch.float64) if isinstance(value, float) else value


@pytest.mark.parametrize(
    "name,kwargs", [(name, kwargs) for name in MAKERS for kwargs in registry.BY_NAME[name].cases()]
)
def test_every_case_with_tensor_hyperparameters_equals_the_reference(name, kwargs):
    """Every float as a 0-d tensor (the injected and scheduled form): the choices made on Python
    numbers (beta1 = 0, no weight decay) are made with torch.where instead, to the same numbers."""
    make, reference = MAKERS[name]
    params = make_params()
    tx = make(**{k: _as_tensors(v) for k, v in kwargs.items()})
    state = tx.init(params)
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = reference(list(tensors.values()), **kwargs)
    for t in range(STEPS):
        grads = gradient(params, t)
        for k, v in tensors.items():
            v.grad = grads[k].clone()
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
    assert relative_error(params, {k: v.detach() for k, v in tensors.items()}) <= 1e-12


def test_fsdp_in_use_and_log_every_are_not_arguments():
    """The packages' switches functrain has no use for are refused by name, not silently taken."""
    with pytest.raises(TypeError, match="fsdp_in_use"):
        ft.prodigy(fsdp_in_use=True)
    with pytest.raises(TypeError, match="log_every"):
        ft.dadapt_adam(log_every=10)


# ----------------------------------------------------------------------------- resume mid-run


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


@pytest.mark.parametrize("name", MAKERS)
def test_resumed_mid_run_from_a_checkpoint_equals_the_uninterrupted_run_and_the_reference(name, tmp_path):
    make, reference = MAKERS[name]
    torch.manual_seed(0)
    model = Net().double()
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(16, 4, generator=g, dtype=torch.float64) for _ in range(20)]
    batches = [(x, x.sum(1, keepdim=True).sin()) for x in inputs]
    kwargs = {"weight_decay": 0.01, "use_bias_correction": True}
    tx = make(**kwargs)
    step = ft.make_train_step(model, loss_fn, tx)

    uninterrupted = ft.TrainState.create(model, tx)
    for batch in batches:
        uninterrupted, _ = step(uninterrupted, batch)

    state = ft.TrainState.create(model, tx)
    for batch in batches[:10]:
        state, _ = step(state, batch)
    path = ft.save_checkpoint(tmp_path / "mid.pt", state)
    resumed, _ = ft.load_checkpoint(path, ft.TrainState.create(model, tx))
    assert int(core_state(resumed.opt_state).k) == 10
    for batch in batches[10:]:
        resumed, _ = step(resumed, batch)
    for a, b in zip(ft._tree.leaves(resumed), ft._tree.leaves(uninterrupted)):
        assert torch.equal(a, b)

    # and the package, stepped by hand on the same batches
    theirs = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    opt = reference(list(theirs.values()), **kwargs)
    for batch in batches:
        opt.zero_grad()
        loss_fn(lambda x: torch.func.functional_call(model, theirs, (x,)), batch).backward()
        opt.step()
    assert relative_error(resumed.params, {k: v.detach() for k, v in theirs.items()}) <= 1e-12
    assert close(float(core_state(resumed.opt_state).d), opt.param_groups[0]["d"])


# ----------------------------------------------------------------------------- sharded


def collectives_scenario(rank):
    """Collectives in one sharded update (params over 2 ranks, one split unevenly, some replicated)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    from .test_sharding import make_model

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    out = {}
    for name, (make, _) in MAKERS.items():
        tx = make(weight_decay=0.1)
        state = ft.TrainState.create(make_model(), tx, mesh=mesh)
        grads = {k: torch.ones_like(p) for k, p in state.params.items()}
        with CommDebugMode() as comms:
            tx.update(grads, state.opt_state, state.params)
        out[name] = torch.tensor(comms.get_total_counts())
    return out


def test_sharded_estimate_takes_one_all_reduce_per_step(tmp_path):
    """The whole tree's sums (both of them, every sharded tensor) go in one collective, not one per
    tensor; that the sharded step equals one process's is test_sharding's registry test."""
    from .ranks import run_on_ranks

    for rank in run_on_ranks(collectives_scenario, 2, tmp_path):
        assert {name: int(count) for name, count in rank.items()} == {name: 1 for name in MAKERS}


def compiled_scenario(rank):
    """A compiled sharded step (collectives inside the graph) against eager, unsharded, one process.
    Prodigy only: D-Adaptation's estimate is reduced by the same code, and each compile takes a minute."""
    from torch._dynamo.utils import counters

    from . import test_sharding as ts

    world, mesh = torch.distributed.get_world_size(), ts.mesh_1d()
    data = ts.batches(n=4)
    out = {}
    for name in ["prodigy"]:
        make = MAKERS[name][0]
        kwargs = {"weight_decay": 0.1, "d0": 1e-3}
        model = ts.make_model()
        reference, _ = ts.train(model, make(**kwargs), data)
        torch._dynamo.reset()
        counters.clear()
        state = ft.TrainState.create(model, make(**kwargs), mesh=mesh)
        step = ft.make_train_step(model, ts.loss_fn, make(**kwargs), mesh=mesh, compile=True)
        for batch in data:
            state, _ = step(state, ts.part(batch, rank, world))
        whole = ts.whole(state)
        out[name] = torch.tensor(
            [
                ts.max_relative_error(whole.params, reference.params),
                ts.max_relative_error(whole.opt_state, reference.opt_state),
                counters["stats"]["unique_graphs"],
            ]
        )
    return out


@pytest.mark.slow
def test_compiled_sharded_step_equals_eager_one_process_in_one_graph(tmp_path):
    from .ranks import run_on_ranks

    for rank in run_on_ranks(compiled_scenario, 2, tmp_path):
        for name, (params, opt_state, graphs) in rank.items():
            assert params < 1e-12 and opt_state < 1e-12 and graphs == 1, (name, params, opt_state, graphs)
