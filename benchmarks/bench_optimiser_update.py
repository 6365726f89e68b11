"""One eager optimiser step over a transformer-sized parameter set: functrain against torch.optim.

Each group times the same update, side by side in one run:

- ``functrain``: ``updates, state = tx.update(grads, state, params); params = ft.apply_updates(params,
  updates)``, the new params and state carried into the next round as a training loop would (pure:
  every round allocates the new moments, updates and params).
- ``torch-forloop`` / ``torch-foreach`` / ``torch-fused``: ``opt.step()`` of the torch.optim class
  with ``foreach=False`` / ``foreach=True`` / ``fused=True``, in place, ``.grad`` set once.

All take the same float32 parameters and the same gradients every step; the gradient computation
is not timed. Sizes and rounds come from ``--bench-scale`` (see conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import functrain as ft

LR = 1e-3
WEIGHT_DECAY = 1e-2
MOMENTUM = 0.9

# The torch.optim variants, by the id each gets in the results (report.py's baselines use these ids).
TORCH_VARIANTS: dict[str, dict[str, bool]] = {
    "torch-forloop": {"foreach": False, "fused": False},
    "torch-foreach": {"foreach": True, "fused": False},
    "torch-fused": {"fused": True},
}
IMPLEMENTATIONS = ["functrain", *TORCH_VARIANTS]


class Stepper:
    """A zero-argument step that carries its optimiser's state, and a check that it ran."""

    def __init__(self, step: Callable[[], None], current_params: Callable[[], list[Tensor]]):
        self._step = step
        self._current_params = current_params
        self.calls = 0

    def __call__(self) -> None:
        self._step()
        self.calls += 1

    def check(self, initial: dict[str, Tensor]) -> None:
        assert self.calls >= 1, "the step never ran"
        final = self._current_params()
        assert len(final) == len(initial)
        for p in final:
            assert torch.isfinite(p).all(), "non-finite parameters after the benchmarked steps"
        first = next(iter(initial.values()))
        assert not torch.equal(final[0], first), "the step left the parameters unchanged"


def functrain_stepper(tx: ft.GradientTransformation, params: dict[str, Tensor], grads: dict[str, Tensor]) -> Stepper:
    carry = {"params": params, "state": tx.init(params)}

    def step() -> None:
        updates, carry["state"] = tx.update(grads, carry["state"], carry["params"])
        carry["params"] = ft.apply_updates(carry["params"], updates)

    return Stepper(step, lambda: list(carry["params"].values()))


def torch_stepper(
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
) -> Stepper:
    ps = [torch.nn.Parameter(t.clone()) for t in params.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = g
    opt = make_optimizer(ps)
    return Stepper(opt.step, lambda: [p.detach() for p in ps])


def make_stepper(impl: str, params, grads, functrain_tx, torch_cls, **torch_kwargs) -> Stepper:
    if impl == "functrain":
        return functrain_stepper(functrain_tx(), params, grads)
    variant = TORCH_VARIANTS[impl]
    return torch_stepper(lambda ps: torch_cls(ps, **torch_kwargs, **variant), params, grads)


@pytest.mark.benchmark(group="adamw-update")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_adamw_update(impl, params, grads, run_steps):
    """AdamW(lr=1e-3, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8): one step."""
    stepper = make_stepper(
        impl,
        params,
        grads,
        functrain_tx=lambda: ft.adamw(lr=LR, weight_decay=WEIGHT_DECAY),
        torch_cls=torch.optim.AdamW,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
    )
    run_steps(stepper, optimizer="adamw", impl=impl)
    stepper.check(params)


@pytest.mark.benchmark(group="sgd-momentum-update")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_sgd_momentum_update(impl, params, grads, run_steps):
    """SGD(lr=1e-3, momentum=0.9): one step."""
    stepper = make_stepper(
        impl,
        params,
        grads,
        functrain_tx=lambda: ft.sgd(lr=LR, momentum=MOMENTUM),
        torch_cls=torch.optim.SGD,
        lr=LR,
        momentum=MOMENTUM,
    )
    run_steps(stepper, optimizer="sgd-momentum", impl=impl)
    stepper.check(params)
