"""Careless input to the step and the hyperparameter API gets the error the eager code gives, by name.

- ``set_hyperparams`` refuses what the optimiser's constructor refuses (every registry entry's bad
  values, NaN), and a tensor hyperparameter must be 0-d in the constructor too.
- The train step names a float metric, a loss detached from the parameters, and a submodule the model
  creates while it runs; compiled, the same error type and message reach the user (not dynamo's
  ``Unsupported: Observed exception``), for functrain's own checks and for a batch the model rejects.
- A checkpoint of one optimiser does not load into a run of another, and the error names both.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft

from .registry import SPECS

# ----------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_set_hyperparams_refuses_what_the_constructor_refuses(spec):
    tx = ft.inject_hyperparams(spec.make)(**spec.cases()[0])
    shapes = {"w": (4, 3)}
    state = tx.init({k: torch.ones(s) for k, s in shapes.items()})
    injected = ft.hyperparams(state)
    checked = 0
    for kwargs, argument in spec.bad:
        if not all(name in injected or f"{name}.0" in injected for name in kwargs):
            continue  # a static option (e.g. adjust_lr_fn), not an injected hyperparameter
        with pytest.raises(ValueError, match=re.escape(argument)):
            ft.set_hyperparams(state, **kwargs)
        checked += 1
    assert checked, f"{spec.name}: no bad value reached set_hyperparams"
    with pytest.raises(ValueError, match="set_hyperparams: .*lr"):
        ft.set_hyperparams(state, lr=math.nan)
    assert float(ft.hyperparams(ft.set_hyperparams(state, lr=1e-4))["lr"]) == 1e-4  # a good value still goes in


def test_set_hyperparams_of_a_custom_factory_refuses_non_finite_values():
    def factory(lr: float = 0.1):
        return ft.transforms.scale(-lr)

    state = ft.inject_hyperparams(factory)().init({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="lr must be finite"):
        ft.set_hyperparams(state, lr=math.inf)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_a_tensor_hyperparameter_must_be_0d_in_the_constructor(spec):
    with pytest.raises(ValueError, match=r"lr.*must be 0-d.*got shape \(1,\)"):
        spec.make(**{**spec.cases()[0], "lr": torch.tensor([0.01])})
    with pytest.raises(ValueError, match=r"must be a number or a 0-d tensor, got shape \(1,\)"):
        tx = ft.inject_hyperparams(spec.make)(**spec.cases()[0])
        ft.set_hyperparams(tx.init({"w": torch.ones(4, 3)}), lr=torch.tensor([0.01]))


# ----------------------------------------------------------------------------- the step


def _loss(m, batch):
    x, y = batch
    return F.cross_entropy(m(x), y)


def _float_loss(m, batch):
    return 0.5


def _float_metric(m, batch):
    return _loss(m, batch), {"acc": 0.5}


def _detached(m, batch):
    return _loss(m, batch).detach()


class GrowsInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 3)

    def forward(self, x):
        self.head = nn.Linear(3, 2)  # a new random layer each call, never in the state
        return self.head(self.body(x))


BATCH = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
CASES = {
    "float loss": (nn.Linear(3, 2), _float_loss, BATCH, TypeError, "must return a 0-d floating-point loss"),
    "float metric": (nn.Linear(3, 2), _float_metric, BATCH, TypeError, "metric 'acc' must be a 0-d tensor"),
    "detached loss": (nn.Linear(3, 2), _detached, BATCH, ValueError, "does not depend on the model's parameters"),
    "module made in forward": (GrowsInForward(), _loss, BATCH, ValueError, "created 'head.weight' while it ran"),
    "batch the model rejects": (
        nn.Linear(3, 2),
        _loss,
        (torch.randn(4, 5), BATCH[1]),
        RuntimeError,
        "the model or loss_fn rejected the batch",
    ),
}


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", CASES)
def test_the_step_names_careless_input_and_compiled_gives_the_same_error(case, compile):
    model, loss_fn, batch, error, message = CASES[case]
    tx = ft.sgd(lr=0.1)
    step = ft.make_train_step(model, loss_fn, tx, compile=compile)
    with pytest.raises(error, match=re.escape(message)):
        step(ft.TrainState.create(model, tx), batch)


@pytest.mark.slow
def test_a_compiled_step_given_another_optimisers_state_raises_the_eager_error():
    """The state changes after the step compiled: dynamo retraces and fails; the eager error is raised."""
    model = nn.Linear(3, 2)
    tx = ft.adam(lr=1e-3)
    step = ft.make_train_step(model, _loss, tx, compile=True)
    state, _ = step(ft.TrainState.create(model, tx), BATCH)
    foreign = state._replace(opt_state=ft.adamax(lr=1e-3).init(state.params))
    with pytest.raises(ValueError, match=re.escape("ft.adam.update got ft.adamax's state (AdamaxState)")) as info:
        step(foreign, BATCH)
    assert "Observed exception" in repr(info.value.__context__) or info.value.__context__ is not None
    state, _ = step(state, BATCH)  # and the right state still steps
    assert int(state.step) == 2


def test_an_adam_checkpoint_does_not_load_into_an_adamax_run_and_names_both(tmp_path):
    params = {"w": torch.randn(3, 3)}
    saved = ft.TrainState(params, {}, ft.adam(1e-3).init(params), torch.zeros((), dtype=torch.int64))
    ft.save_checkpoint(tmp_path / "c.pt", saved)
    like = saved._replace(opt_state=ft.adamax(1e-3).init(params))
    with pytest.raises(ValueError, match=re.escape("ft.adam's state (AdamState) vs ft.adamax's state (AdamaxState)")):
        ft.load_checkpoint(tmp_path / "c.pt", like)


@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace-fused"])
@pytest.mark.parametrize(
    "make", [lambda: ft.adam(lr=1e-3), lambda: ft.adam(lr=1e-3, amsgrad=True), lambda: ft.lamb(lr=1e-3)]
)
def test_an_opt_state_from_a_smaller_model_is_named_before_any_kernel(make, inplace):
    """params fit the model, opt_state came from a smaller one with the same names: once a segfault
    in torch's fused kernels, now the first differing key."""
    model, small = nn.Linear(3, 2), nn.Linear(2, 2)
    tx = make()
    state = ft.TrainState.create(model, tx)._replace(opt_state=tx.init(dict(small.named_parameters())))
    step = ft.make_train_step(model, _loss, tx, inplace=inplace)
    with pytest.raises(
        ValueError, match=r"differ in shape at opt_state\.inner_state\[0\]\.mu\['weight'\]: \(2, 3\) vs \(2, 2\)"
    ):
        step(state, BATCH)


def test_the_first_call_check_draws_no_random_numbers():
    """The compiled step's first-call check runs the model once more; with dropout that would shift the
    random stream, and a run resumed in a new process (which checks again) would not continue bitwise."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    tx = ft.sgd(lr=0.1)
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))

    def run(compile):
        torch.manual_seed(1)
        state, step = ft.TrainState.create(model, tx), ft.make_train_step(model, _loss, tx, compile=compile)
        for _ in range(3):
            state, _ = step(state, batch)
        return state.params, torch.rand(4)

    eager_params, eager_next = run(False)
    # aot_eager draws eager's random numbers; static shapes, as other tests compile _loss at other batch sizes
    # (dropout under torch.func.grad cannot trace symbolic sizes).
    compiled_params, compiled_next = run({"backend": "aot_eager", "dynamic": False})
    assert torch.equal(compiled_next, eager_next)
    for name, p in eager_params.items():
        torch.testing.assert_close(compiled_params[name], p)


def test_a_compiled_step_with_dropout_takes_a_second_batch_size():
    """An epoch's smaller last batch: with dynamo's automatic dynamic shapes the step retraced with a
    symbolic batch size, which dropout under torch.func.grad cannot trace, and training failed there."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    tx = ft.sgd(lr=0.1)
    step = ft.make_train_step(model, _loss, tx, compile={"backend": "aot_eager"})
    state = ft.TrainState.create(model, tx)
    for n in (16, 12, 8):
        state, metrics = step(state, (torch.randn(n, 4), torch.randint(0, 2, (n,))))
        assert torch.isfinite(metrics["loss"])
    assert int(state.step) == 3


def test_no_optimisers_checkpoint_loads_into_another_optimisers_run(tmp_path):
    """Every ordered pair of registry optimisers: the checkpoint is refused, and the error names both."""
    params = {"w": torch.randn(4, 3), "v": torch.randn(3, 5)}  # matrices: Muon takes them too
    states = {spec.name: spec.make(**spec.cases()[0]).init(params) for spec in SPECS}
    step = torch.zeros((), dtype=torch.int64)
    accepted = []
    for saved_by, saved in states.items():
        path = tmp_path / f"{saved_by}.pt"
        ft.save_checkpoint(path, ft.TrainState(params, {}, saved, step))
        for loaded_by, expected in states.items():
            if loaded_by == saved_by:
                continue
            try:
                ft.load_checkpoint(path, ft.TrainState(params, {}, expected, step))
            except ValueError as error:
                assert f"ft.{saved_by}'s state" in str(error) and f"ft.{loaded_by}'s state" in str(error), error
            else:
                accepted.append((saved_by, loaded_by))
    assert not accepted
