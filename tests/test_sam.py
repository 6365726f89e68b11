"""ft.sam against the reference two-pass SAM written with torch.optim (davda54/sam's ``SAM``, as timm and
mmdetection users run it): first backward, climb to w + e, second backward, restore w, base optimiser step.

SAM needs ``value_fn`` (a second gradient on the same batch), which the registry's synthetic gradients do
not have, so it is not in the common battery; this file covers its points: parity over several steps with
SGD (momentum) and AdamW inside, SAM and ASAM, through a bare ``update`` and through ``make_train_step``
(eager and compiled, no recompiles), BatchNorm's running statistics, the state, and the errors.
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain import _tree


class ReferenceSAM(torch.optim.Optimizer):
    """davda54/sam's ``sam.py`` (SAM and ASAM), written out: the reference two-pass SAM on torch.optim."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)  # climb to the local maximum "w + e(w)"
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]  # get back to "w" from "w + e(w)"
        self.base_optimizer.step()  # do the actual "sharpness-aware" update
        self.zero_grad()

    def _grad_norm(self):
        return torch.norm(
            torch.stack(
                [
                    ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )


def set_bn_momentum(model, momentum):
    """davda54/sam's ``disable_running_stats`` / ``enable_running_stats``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if momentum == 0:
                m.backup_momentum = m.momentum
                m.momentum = 0
            else:
                m.momentum = m.backup_momentum


def reference_run(model, base, kwargs, rho, adaptive, data, *, disable_running_stats=True):
    opt = ReferenceSAM(model.parameters(), base, rho=rho, adaptive=adaptive, **kwargs)
    for batch in data:
        loss_fn(model, batch).backward()
        opt.first_step()
        if disable_running_stats:
            set_bn_momentum(model, 0)
        loss_fn(model, batch).backward()
        opt.second_step()
        if disable_running_stats:
            set_bn_momentum(model, None)
    return model


class Net(nn.Module):
    def __init__(self, batchnorm=False):
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.norm = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
        self.b = nn.Linear(8, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x))))


def make_model(batchnorm=False):
    torch.manual_seed(0)
    return Net(batchnorm).double()


def make_data(n=6):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64))
        for _ in range(n)
    ]


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


BASES = {
    "sgd-momentum": (ft.sgd, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "sgd-nesterov": (ft.sgd, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "adamw": (ft.adamw, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
}
CASES = [
    pytest.param(base, rho, adaptive, id=f"{base}-{'asam' if adaptive else 'sam'}")
    for base in BASES
    for rho, adaptive in [(0.05, False), (0.5, True)]
]


def relative_error(actual: dict, expected: dict) -> float:
    return max(((actual[k] - expected[k]).norm() / expected[k].norm()).item() for k in expected)


@pytest.mark.parametrize("base, rho, adaptive", CASES)
def test_train_step_equals_the_reference_two_pass_sam(base, rho, adaptive):
    ours_factory, torch_class, kwargs = BASES[base]
    model, data = make_model(), make_data()
    tx = ft.sam(ours_factory(**kwargs), rho=rho, adaptive=adaptive)
    state, step = ft.TrainState.create(model, tx), ft.make_train_step(model, loss_fn, tx)
    for batch in data:
        state, _ = step(state, batch)
    expected = dict(reference_run(copy.deepcopy(model), torch_class, kwargs, rho, adaptive, data).named_parameters())
    assert relative_error(state.params, {k: v.detach() for k, v in expected.items()}) <= 1e-10
    # ... and not the base optimiser alone: the second gradient matters.
    plain = ft.TrainState.create(model, tx)
    plain_step = ft.make_train_step(model, loss_fn, ours_factory(**kwargs))
    for batch in data:
        plain, _ = plain_step(plain, batch)
    assert relative_error(plain.params, state.params) > 1e-4


@pytest.mark.parametrize("adaptive", [False, True])
def test_bare_update_with_value_fn_equals_the_reference(adaptive):
    """No make_train_step: the loss of a tiny regression in closed form, its gradient by torch.func."""
    model, data = make_model(), make_data(4)
    params = {k: v.detach() for k, v in model.named_parameters()}
    tx = ft.sam(ft.sgd(lr=0.05, momentum=0.9), rho=0.1, adaptive=adaptive)
    state = tx.init(params)
    for batch in data:
        loss_at = lambda p, b=batch: loss_fn(lambda x: torch.func.functional_call(model, p, (x,)), b)  # noqa: E731
        value_fn = lambda p, f=loss_at: tuple(reversed(torch.func.grad_and_value(f)(p)))  # noqa: E731
        updates, state = tx.update(torch.func.grad(loss_at)(params), state, params, value_fn=value_fn)
        params = ft.apply_updates(params, updates)
    reference = reference_run(copy.deepcopy(model), torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, 0.1, adaptive, data)
    assert relative_error(params, {k: v.detach() for k, v in reference.named_parameters()}) <= 1e-10


def test_inplace_step_with_the_fused_adamw_equals_the_pure_step():
    """sam passes AdamW's fused kernel on: an in-place eager step runs it, equal to the pure one to rounding."""
    model, data = make_model(), make_data(3)
    tx = ft.sam(ft.adamw(lr=1e-2, weight_decay=0.1))
    assert tx.update_and_apply is not None
    results = []
    for inplace in (False, True):
        state = ft.TrainState.create(copy.deepcopy(model), tx)
        step = ft.make_train_step(model, loss_fn, tx, inplace=inplace)
        for batch in data:
            state, _ = step(state, batch)
        results.append(state.params)
    assert relative_error(results[1], results[0]) <= 1e-12


def test_batchnorm_running_statistics_move_once_per_step_from_the_first_pass():
    """functrain's value_fn drops the second pass's buffer updates: davda54's recipe (BatchNorm momentum 0 for
    the second pass). A two-pass loop that leaves it on moves the running statistics twice per step."""
    model, data = make_model(batchnorm=True), make_data(4)
    tx = ft.sam(ft.sgd(lr=0.05, momentum=0.9), rho=0.05)
    state, step = ft.TrainState.create(model, tx), ft.make_train_step(model, loss_fn, tx)
    for batch in data:
        state, _ = step(state, batch)
    kwargs = {"lr": 0.05, "momentum": 0.9}
    recipe = reference_run(copy.deepcopy(model), torch.optim.SGD, kwargs, 0.05, False, data)
    twice = reference_run(copy.deepcopy(model), torch.optim.SGD, kwargs, 0.05, False, data, disable_running_stats=False)
    assert relative_error(state.params, {k: v.detach() for k, v in recipe.named_parameters()}) <= 1e-10
    for name in ("norm.running_mean", "norm.running_var"):
        expected = dict(recipe.named_buffers())[name]
        assert relative_error({name: state.buffers[name]}, {name: expected}) <= 1e-10
        assert relative_error({name: state.buffers[name]}, {name: dict(twice.named_buffers())[name]}) > 1e-3
    assert int(state.buffers["norm.num_batches_tracked"]) == len(data)  # once per step (the twice loop: 2x)
    # The parameters agree either way: train-mode BatchNorm normalises with the batch's own statistics.
    assert relative_error(state.params, {k: v.detach() for k, v in twice.named_parameters()}) <= 1e-10


def test_the_state_is_the_inner_optimisers_own():
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    inner = ft.adamw(lr=1e-3)
    state = ft.sam(inner).init(params)
    assert _tree.structure(state) == _tree.structure(inner.init(params))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert _tree.structure(torch.load(buffer, weights_only=True)) == _tree.structure(state)


def test_without_value_fn_it_says_how_to_run_it():
    params = {"w": torch.ones(3)}
    tx = ft.sam(ft.sgd(lr=0.1))
    with pytest.raises(ValueError, match=r"sam needs the value_fn extra argument.*ft\.make_train_step"):
        tx.update({"w": torch.ones(3)}, tx.init(params), params)
    with pytest.raises(ValueError, match="sam needs params"):
        tx.update({"w": torch.ones(3)}, tx.init(params), value_fn=lambda p: (torch.tensor(0.0), p))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=re.escape("sam: rho must be >= 0")):
        ft.sam(ft.sgd(lr=0.1), rho=-0.1)
    with pytest.raises(TypeError, match="rho"):
        ft.sam(ft.sgd(lr=0.1), rho=lambda count: 0.1)
    with pytest.raises(TypeError, match="adaptive"):
        ft.sam(ft.sgd(lr=0.1), adaptive=1)
    with pytest.raises(TypeError, match="tx must be a GradientTransformation"):
        ft.sam(ft.sgd)


def test_mismatched_gradients_are_named_before_the_perturbation():
    params = {"w": torch.ones(3)}
    tx = ft.sam(ft.sgd(lr=0.1))
    with pytest.raises(ValueError, match=r"\['w'\]"):
        tx.update({"w": torch.ones(4)}, tx.init(params), params, value_fn=lambda p: (torch.tensor(0.0), p))


@pytest.mark.slow
def test_compiled_train_step_equals_eager_and_never_recompiles():
    torch._dynamo.reset()
    model, data = make_model(), make_data(5)
    tx = ft.sam(ft.inject_hyperparams(ft.adamw)(lr=1e-2, weight_decay=0.1), rho=0.05)
    runs = []
    for compile in (False, True):
        state, step = ft.TrainState.create(model, tx), ft.make_train_step(model, loss_fn, tx, compile=compile)
        losses = []
        for i, batch in enumerate(data):
            if i == 1:  # the lr moves too: a tensor in the state, no recompile
                state = state._replace(opt_state=ft.set_hyperparams(state.opt_state, lr=5e-3))
            with torch.compiler.set_stance("fail_on_recompile" if compile and i >= 1 else "default"):
                state, metrics = step(state, batch)
            losses.append(metrics["loss"])
        runs.append((state, losses))
    (eager, eager_losses), (compiled, compiled_losses) = runs
    assert relative_error(compiled.params, eager.params) <= 1e-12
    torch.testing.assert_close(torch.stack(compiled_losses), torch.stack(eager_losses), rtol=1e-12, atol=0)


def sharded_scenario(rank):
    """SAM (global norm over every shard) and ASAM sharded over the ranks, against one process."""
    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    data = make_data(3)
    out = []
    for adaptive in (False, True):
        tx = ft.sam(ft.adamw(lr=1e-2, weight_decay=0.1), rho=0.5 if adaptive else 0.05, adaptive=adaptive)
        finals = []
        for sharded in (True, False):
            model = make_model()
            state = ft.TrainState.create(model, tx, mesh=mesh if sharded else None)
            step = ft.make_train_step(model, loss_fn, tx, mesh=mesh if sharded else None)
            for x, y in data:
                state, _ = step(state, (x.chunk(world)[rank], y.chunk(world)[rank]) if sharded else (x, y))
            finals.append(ft.distributed.full_tensors(state.params))
        out.append(finals)
    return out


def test_sharded_over_two_ranks_equals_one_process(tmp_path):
    from .ranks import run_on_ranks

    for out in run_on_ranks(sharded_scenario, 2, tmp_path):
        for sharded, single in out:
            assert relative_error(sharded, single) <= 1e-12
