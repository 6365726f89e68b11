"""ft.cautious beyond the battery (which checks ft.cautious(ft.adamw(...)) against the paper's C-AdamW):
the mask and its rescaling on a known update, the wrapper over several inner optimisers against the
cautious rule written imperatively around their torch.optim / paper references, C-AdamW with weight
decay, maximisation, and the inner state left as the plain optimiser's."""

from __future__ import annotations

import pytest
import torch

import functrain as ft

from . import references
from .harness import gradient, make_params, relative_error, run_functrain, run_reference
from .registry import BY_NAME

CautiousAdamW = BY_NAME["cautious"].reference  # the paper's C-AdamW (tests/specs_pytorch_optimizer.py)

STEPS = 25


class Cautious(torch.optim.Optimizer):
    """The cautious rule (Liang et al. 2024, Algorithm 1) around any optimiser, imperatively: the base
    optimiser steps as usual; its step ``u = p_new - p_old`` is then kept only where it descends (``u * g < 0``;
    ``g`` negated when the base maximises) and rescaled by the kept fraction of the tensor, floored at 1e-3."""

    def __init__(self, params, base, maximize=False, **kwargs):
        params = list(params)
        self.base = base(params, maximize=maximize, **kwargs) if maximize else base(params, **kwargs)
        self.maximize = maximize
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        before = [p.clone() for p in params]
        grads = [-p.grad if self.maximize else p.grad.clone() for p in params]
        self.base.step()
        for p, old, g in zip(params, before, grads):
            u = p - old
            phi = (u * g < 0).to(p.dtype)
            p.copy_(old + u * phi / phi.mean().clamp(min=1e-3))
        return None


def constant(values):
    """A stub optimiser whose update is always ``values``: the mask's arithmetic on a known update."""

    def update(updates, state, params=None, **extra):
        return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in values.items()}, state

    return ft.GradientTransformation(lambda params: ft.EmptyState(), update)


def test_the_mask_keeps_descending_components_and_rescales_by_the_kept_fraction_per_tensor():
    params = {"a": torch.zeros(4, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    grads = {"a": torch.ones(4, dtype=torch.float64), "b": torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)}
    # Updates are added to the params: with g > 0, only negative components go downhill.
    tx = ft.cautious(constant({"a": [-1.0, 2.0, -3.0, 4.0], "b": [-1.0, -1.0, -1.0]}))
    updates, _ = tx.update(grads, tx.init(params), params)
    torch.testing.assert_close(updates["a"], torch.tensor([-2.0, 0.0, -6.0, 0.0], dtype=torch.float64))  # 2 of 4 kept
    torch.testing.assert_close(updates["b"], torch.tensor([-1.5, 0.0, -1.5], dtype=torch.float64))  # 2 of 3 kept


def test_the_rescaling_is_floored_at_a_kept_fraction_of_one_in_a_thousand():
    n = 10_000
    params = {"w": torch.zeros(n, dtype=torch.float64)}
    update = torch.ones(n, dtype=torch.float64)
    update[0] = -1.0  # one component of 10,000 descends (g > 0)
    tx = ft.cautious(constant({"w": update}))
    out, _ = tx.update({"w": torch.ones(n, dtype=torch.float64)}, tx.init(params), params)
    assert out["w"][0].item() == -1000.0  # 1 / max(1e-4, 1e-3), not 1 / 1e-4
    assert torch.count_nonzero(out["w"]).item() == 1
    uphill = ft.cautious(constant({"w": update.abs()}))
    nothing, _ = uphill.update({"w": torch.ones(n, dtype=torch.float64)}, uphill.init(params), params)
    assert torch.count_nonzero(nothing["w"]).item() == 0  # every component uphill: no step at all


INNER = {
    "sgd-momentum": (lambda: ft.sgd(lr=0.05, momentum=0.9), torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "sgd-nesterov": (
        lambda: ft.sgd(lr=0.05, momentum=0.9, nesterov=True),
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    ),
    "lion": (lambda: ft.lion(lr=1e-2, weight_decay=0.1), references.Lion, {"lr": 1e-2, "weight_decay": 0.1}),
    "adam": (lambda: ft.adam(lr=0.01), torch.optim.Adam, {"lr": 0.01}),
    # The decay inside AdamW is masked with the rest: equal to the cautious rule around torch's AdamW.
    "adamw": (lambda: ft.adamw(lr=0.01, weight_decay=0.1), torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
}


@pytest.mark.parametrize("name", INNER)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cautious_over_an_inner_optimiser_equals_the_rule_around_its_reference(name, dtype):
    make, base, kwargs = INNER[name]
    params = make_params(dtype)
    ours = run_functrain(ft.cautious(make()), params, STEPS)
    expected = run_reference(lambda ps, **kw: Cautious(ps, base, **kw), kwargs, params, STEPS)
    assert relative_error(ours, expected) <= (1e-7 if dtype == torch.float64 else 1e-5)
    # ... and the mask did something: the plain optimiser ends elsewhere.
    assert relative_error(run_functrain(make(), params, STEPS), expected) > 1e-3


def test_c_adamw_with_weight_decay_is_the_masked_adam_step_then_the_decay():
    """The paper's C-AdamW decays outside the mask: mask Adam's step at lr 1, then decay and scale by lr."""
    lr, wd = 0.01, 0.1
    tx = ft.chain(
        ft.cautious(ft.adam(lr=1.0)),
        ft.transforms.scale(-1.0),
        ft.transforms.add_decayed_weights(wd),
        ft.transforms.scale_by_learning_rate(lr),
    )
    params = make_params()
    expected = run_reference(CautiousAdamW, {"lr": lr, "weight_decay": wd}, params, STEPS)
    assert relative_error(run_functrain(tx, params, STEPS), expected) <= 1e-7
    # ft.cautious(ft.adamw(...)) masks the decay too: a different optimiser when weight_decay > 0.
    masked_decay = run_functrain(ft.cautious(ft.adamw(lr=lr, weight_decay=wd)), params, STEPS)
    assert relative_error(masked_decay, expected) > 1e-6


def test_to_maximise_negate_the_gradients_before_the_wrapper():
    tx = ft.chain(ft.transforms.scale(-1.0), ft.cautious(ft.adam(lr=0.01)))
    params = make_params()
    expected = run_reference(
        lambda ps, **kw: Cautious(ps, torch.optim.Adam, maximize=True, **kw), {"lr": 0.01}, params, STEPS
    )
    assert relative_error(run_functrain(tx, params, STEPS), expected) <= 1e-7


def test_the_inner_optimiser_keeps_the_state_it_would_have_without_the_mask():
    """Only the proposed step is masked: the momentum is the plain optimiser's, given the same gradients."""
    params = make_params()
    plain, wrapped = ft.sgd(lr=0.1, momentum=0.9), ft.cautious(ft.sgd(lr=0.1, momentum=0.9))
    plain_state, wrapped_state = plain.init(params), wrapped.init(params)
    for t in range(5):
        grads = gradient(params, t)  # the same gradients for both (at the initial params)
        _, plain_state = plain.update(grads, plain_state, params)
        masked, wrapped_state = wrapped.update(grads, wrapped_state, params)
    # The wrapper's state is the inner optimiser's own (so a checkpoint of either resumes under the other).
    assert ft._tree.structure(wrapped_state) == ft._tree.structure(plain_state)
    for a, b in zip(ft._tree.leaves(plain_state), ft._tree.leaves(wrapped_state)):
        assert torch.equal(a, b)
    assert any((u == 0).any() for u in masked.values())  # and some component was masked on the way


def test_cautious_refuses_what_is_not_a_transformation_and_complex_parameters():
    with pytest.raises(TypeError, match="cautious: tx must be a GradientTransformation"):
        ft.cautious(ft.adamw)
    tx = ft.cautious(ft.adam(lr=0.1))  # adam itself steps complex parameters; the sign mask cannot
    z = {"real": torch.ones(2), "z": torch.ones(2, dtype=torch.complex64)}
    with pytest.raises(TypeError, match=r"ft\.cautious does not support complex parameters \('z' is torch.complex64\)"):
        tx.init(z)
    with pytest.raises(TypeError, match="ft.cautious does not support complex"):
        tx.update(z, tx.init({"real": torch.ones(2), "z": torch.ones(2)}), z)
