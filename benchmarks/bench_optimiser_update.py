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

import inspect
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
    accepted = inspect.signature(torch_cls).parameters  # e.g. Adafactor has no `fused` switch
    variant = {k: v for k, v in TORCH_VARIANTS[impl].items() if k in accepted}
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


# ----------------------------------------------------------------------------- more optimisers, and compiled

# Adafactor and Muon have no fused torch.optim kernel; Muon orthogonalises matrices only (torch.optim.Muon
# refuses vectors), so its group takes the matrices of the parameter set; Lion has no torch.optim class.
UNFUSED_IMPLEMENTATIONS = ["functrain", "torch-forloop", "torch-foreach"]


def compiled_functrain_stepper(tx, params, grads) -> Stepper:
    """The update compiled with ``fullgraph=True`` and written into the state's tensors (in-place),
    as a compiled train step does: the update alone, without the forward and backward."""
    params = {k: v.clone() for k, v in params.items()}  # written in place: keep the caller's for check()
    carry = {"params": params, "state": tx.init(params)}

    def update(params, state, grads):
        updates, new_state = tx.update(grads, state, params)
        new_params = ft.apply_updates(params, updates)
        for old, new in zip(ft._tree.leaves((params, state)), ft._tree.leaves((new_params, new_state))):
            old.copy_(new)

    compiled = torch.compile(update, fullgraph=True)

    def step() -> None:
        compiled(carry["params"], carry["state"], grads)

    return Stepper(step, lambda: list(carry["params"].values()))


@pytest.mark.benchmark(group="adamw-update")
@pytest.mark.parametrize("impl", ["functrain-compiled"])
def test_adamw_update_compiled(impl, params, grads, run_steps, bench_config):
    """AdamW(lr=1e-3, weight_decay=1e-2): the compiled, in-place functrain update."""
    if bench_config.scale.name == "smoke":
        pytest.skip("compiling takes tens of seconds: not at --bench-scale smoke")
    stepper = compiled_functrain_stepper(ft.adamw(lr=LR, weight_decay=WEIGHT_DECAY), params, grads)
    run_steps(stepper, optimizer="adamw", impl=impl)
    stepper.check(params)


@pytest.mark.benchmark(group="adafactor-update")
@pytest.mark.parametrize("impl", UNFUSED_IMPLEMENTATIONS)
def test_adafactor_update(impl, params, grads, run_steps):
    """Adafactor(lr=1e-2): torch.optim's defaults."""
    stepper = make_stepper(
        impl, params, grads, functrain_tx=lambda: ft.adafactor(lr=1e-2), torch_cls=torch.optim.Adafactor, lr=1e-2
    )
    run_steps(stepper, optimizer="adafactor", impl=impl)
    stepper.check(params)


@pytest.mark.benchmark(group="muon-update")
@pytest.mark.parametrize("impl", ["functrain", "torch-forloop"])
def test_muon_update(impl, params, grads, run_steps):
    """Muon(lr=1e-3) on two of the matrices: momentum 0.95, Nesterov, 5 Newton-Schulz steps.

    Two, because each 1024 x 1024 matrix costs ~32 GFLOP of matmuls per step (seconds on a CPU)."""
    matrices = dict([(k, v) for k, v in params.items() if v.ndim == 2][:2])
    matrix_grads = {k: grads[k] for k in matrices}
    if impl == "functrain":
        stepper = functrain_stepper(ft.muon(lr=1e-3), matrices, matrix_grads)
    else:
        stepper = torch_stepper(lambda ps: torch.optim.Muon(ps, lr=1e-3), matrices, matrix_grads)
    run_steps(stepper, optimizer="muon", impl=impl)
    stepper.check(matrices)


@pytest.mark.benchmark(group="lion-update")
@pytest.mark.parametrize("impl", ["functrain", "functrain-compiled"])
def test_lion_update(impl, params, grads, run_steps, bench_config):
    """Lion(lr=1e-4): no torch.optim class to compare with; eager against compiled."""
    if impl == "functrain-compiled" and bench_config.scale.name == "smoke":
        pytest.skip("compiling takes tens of seconds: not at --bench-scale smoke")
    make = functrain_stepper if impl == "functrain" else compiled_functrain_stepper
    stepper = make(ft.lion(lr=1e-4), params, grads)
    run_steps(stepper, optimizer="lion", impl=impl)
    stepper.check(params)
