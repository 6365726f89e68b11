"""The optimiser update alone over transformer-shaped parameter sets: functrain against torch.optim and torchopt.

Each group times the same update, side by side in one run, at the sizes of ``SCALES`` (conftest.py):
AdamW and SGD-momentum at ~1M, ~10M and ~100M parameters, Adafactor, Muon and Lion at ~10M.

- ``functrain``: ``params, state = ft.update_and_apply(tx, grads, state, params)``, the optimiser's
  declared fast path as a pure training step runs it (AdamW: torch's fused kernel on new copies of the
  params and moments), the new params and state carried into the next round as a training loop would.
- ``functrain-donated``: the same with ``donate=True``, as an eager in-place step runs it (AdamW: the
  fused kernel on the params and moments where they lie, as ``torch.optim.AdamW(fused=True)``).
- ``functrain-update``: the reference, ``updates, state = tx.update(grads, state, params); params =
  ft.apply_updates(params, updates)`` (AdamW: the foreach form).
- ``functrain-compiled``: the same update under ``torch.compile(fullgraph=True)``, written back into
  the params and state tensors (in place), as a compiled train step does.
- ``torch-forloop`` / ``torch-foreach`` / ``torch-fused``: ``opt.step()`` of the torch.optim class
  with ``foreach=False`` / ``foreach=True`` / ``fused=True``, in place, ``.grad`` set once.
- ``torchopt`` / ``torchopt-accelerated``: torchopt's functional API in its in-place form,
  ``updates, state = tx.update(grads, state, params=params, inplace=True);
  torchopt.apply_updates(params, updates, inplace=True)``, with ``torchopt.adamw(...)`` (its C++
  ``use_accelerated_op=True`` Adam kernel for ``-accelerated``) or ``torchopt.sgd(..., momentum=...)``.
- ``copy`` and ``add-inplace`` (group ``copy-bandwidth``): ``dst.copy_(src)`` and ``a.add_(b)`` over
  flat float32 tensors of the size's element count: the device's measured bandwidth, against which
  report.py sets the updates'. A copy's store to ``dst`` first reads the line it writes (write-allocate),
  traffic the 2 x 4N count does not see, so on a CPU the copy understates the limit; ``a.add_(b)``
  reads every line it writes, as an in-place optimiser update does. The limit is the faster of the two.

All take the same float32 parameters and gradients; the gradient computation is not timed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from conftest import SIZE_IDS, compiled_in_place, torchopt_info
from torch import Tensor

import functrain as ft

LR = 1e-3
WEIGHT_DECAY = 1e-2
MOMENTUM = 0.9
COMPILE_SKIP = "compiling takes tens of seconds: not at --bench-scale smoke"

# Memory traffic of one update, in float32 tensors of the parameter set's size that it must read and
# write: what the update cannot avoid moving, each tensor once, without write-allocate or cache
# effects. The one place the bytes come from: each entry records (reads + writes) x 4 bytes x N as
# `bytes_per_update` in its extra_info, and report.py divides it by the median time. The same count
# for every implementation of an optimiser, whatever extra passes or temporaries an implementation
# adds (those show as a lower bandwidth). Muon (matmul-bound) and Adafactor (row/column reductions)
# are not bandwidth-bound and have no entry.
TRAFFIC: dict[str, tuple[int, int]] = {
    "adamw": (4, 3),  # reads param, grad, m, v; writes param, m, v
    "sgd-momentum": (3, 2),  # reads param, grad, momentum buffer; writes param, buffer
    "lion": (3, 2),  # reads param, grad, m; writes param, m
    "copy": (1, 1),  # reads src; writes dst
    "add-inplace": (2, 1),  # reads a, b; writes a
}
BYTES_PER_ELEMENT = 4  # float32

# The torch.optim variants, by the id each gets in the results (report.py's baselines use these ids).
TORCH_VARIANTS: dict[str, dict[str, bool]] = {
    "torch-forloop": {"foreach": False, "fused": False},
    "torch-foreach": {"foreach": True, "fused": False},
    "torch-fused": {"fused": True},
}


def traffic_info(optimizer: str, n: int) -> dict[str, int]:
    """The ``extra_info`` fields report.py reads the bandwidth from; empty for an optimiser without traffic."""
    if optimizer not in TRAFFIC:
        return {}
    reads, writes = TRAFFIC[optimizer]
    return dict(
        tensors_read=reads,
        tensors_written=writes,
        bytes_per_element=BYTES_PER_ELEMENT,
        bytes_per_update=(reads + writes) * BYTES_PER_ELEMENT * n,
    )


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


def functrain_stepper(
    tx: ft.GradientTransformation, params: dict[str, Tensor], grads: dict[str, Tensor], mode: str
) -> Stepper:
    """``mode``: ``"update"`` runs the reference, ``tx.update`` then ``ft.apply_updates``;
    ``"fast"`` runs ``ft.update_and_apply`` (tx's declared fast path, what a train step runs);
    ``"donated"`` the same with ``donate=True``, writing into the params and state (an in-place step)."""
    if mode == "donated":
        params = {k: v.clone() for k, v in params.items()}  # written in place: keep the caller's for check()
    carry = {"params": params, "state": tx.init(params)}

    def step() -> None:
        if mode == "update":
            updates, carry["state"] = tx.update(grads, carry["state"], carry["params"])
            carry["params"] = ft.apply_updates(carry["params"], updates)
        else:
            carry["params"], carry["state"] = ft.update_and_apply(
                tx, grads, carry["state"], carry["params"], donate=mode == "donated"
            )

    return Stepper(step, lambda: list(carry["params"].values()))


FUNCTRAIN_EAGER = {"functrain": "fast", "functrain-donated": "donated", "functrain-update": "update"}


def compiled_functrain_stepper(tx, params, grads) -> Stepper:
    """The update compiled with ``fullgraph=True`` and written into the state's tensors (in-place),
    as a compiled train step does: the update alone, without the forward and backward."""
    # Every compiled entry wraps the same `update` code object; drop the earlier entries' graphs
    # (other sizes, other optimisers) so that their guards are not checked on every call.
    torch.compiler.reset()
    params = {k: v.clone() for k, v in params.items()}  # written in place: keep the caller's for check()
    carry = {"params": params, "state": tx.init(params)}

    compiled = compiled_in_place(tx)

    def step() -> None:
        compiled(carry["params"], carry["state"], grads)

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


def torchopt_stepper(tx, params: dict[str, Tensor], grads: dict[str, Tensor]) -> Stepper:
    """torchopt's functional loop in its in-place form (its fastest): the moments, the params and the
    update are written into existing tensors. The in-place update is computed in the gradient tensors,
    so from the second round on the "gradients" are the previous round's update: the same work on
    different values (in a training loop, backward writes fresh gradients there every step)."""
    import torchopt

    params = {k: v.clone() for k, v in params.items()}  # written in place: keep the caller's for check()
    carry = {"state": tx.init(params)}

    def step() -> None:
        updates, carry["state"] = tx.update(grads, carry["state"], params=params, inplace=True)
        torchopt.apply_updates(params, updates, inplace=True)

    return Stepper(step, lambda: list(params.values()))


@dataclass(frozen=True)
class Optimiser:
    """One optimiser, as each library spells it."""

    name: str  # `optimizer` in extra_info, and the key of TRAFFIC
    functrain: Callable[[], ft.GradientTransformation]
    torch_cls: type[torch.optim.Optimizer] | None
    torch_kwargs: dict = field(default_factory=dict)
    torchopt: Callable[[bool], object] | None = None  # (use_accelerated_op) -> torchopt GradientTransformation


def _torchopt_adamw(accelerated: bool):
    import torchopt

    return torchopt.adamw(lr=LR, weight_decay=WEIGHT_DECAY, use_accelerated_op=accelerated)


def _torchopt_sgd(accelerated: bool):
    import torchopt

    assert not accelerated, "torchopt has no accelerated SGD"
    return torchopt.sgd(lr=LR, momentum=MOMENTUM)


ADAMW = Optimiser(
    "adamw",
    lambda: ft.adamw(lr=LR, weight_decay=WEIGHT_DECAY),
    torch.optim.AdamW,
    dict(lr=LR, weight_decay=WEIGHT_DECAY),
    _torchopt_adamw,
)
SGD_MOMENTUM = Optimiser(
    "sgd-momentum",
    lambda: ft.sgd(lr=LR, momentum=MOMENTUM),
    torch.optim.SGD,
    dict(lr=LR, momentum=MOMENTUM),
    _torchopt_sgd,
)
ADAFACTOR = Optimiser("adafactor", lambda: ft.adafactor(lr=1e-2), torch.optim.Adafactor, dict(lr=1e-2))
LION = Optimiser("lion", lambda: ft.lion(lr=1e-4), None)


def make_stepper(impl: str, opt: Optimiser, params, grads, bench_config) -> Stepper:
    """The ``impl`` entry's stepper for ``opt``; skips the entries that cannot run here."""
    if impl in FUNCTRAIN_EAGER:
        return functrain_stepper(opt.functrain(), params, grads, FUNCTRAIN_EAGER[impl])
    if impl == "functrain-compiled":
        if bench_config.smoke:
            pytest.skip(COMPILE_SKIP)
        return compiled_functrain_stepper(opt.functrain(), params, grads)
    if impl.startswith("torchopt"):
        torchopt = pytest.importorskip("torchopt")
        accelerated = impl == "torchopt-accelerated"
        # is_available() is also true when torchopt's C++ extension failed to load (built for another
        # torch) and its Python version of the op runs: torchopt_info() records which one ran.
        if accelerated and not torchopt.accelerated_op.is_available(bench_config.device):
            pytest.skip(f"torchopt's accelerated Adam op does not run on {bench_config.device} here")
        return torchopt_stepper(opt.torchopt(accelerated), params, {k: g.clone() for k, g in grads.items()})
    accepted = inspect.signature(opt.torch_cls).parameters  # e.g. Adafactor has no `fused` switch
    variant = {k: v for k, v in TORCH_VARIANTS[impl].items() if k in accepted}
    return torch_stepper(lambda ps: opt.torch_cls(ps, **opt.torch_kwargs, **variant), params, grads)


def run_update(impl: str, opt: Optimiser, params, grads, run_steps, bench_config, param_set) -> None:
    stepper = make_stepper(impl, opt, params, grads, bench_config)
    extra = torchopt_info() if impl.startswith("torchopt") else {}
    run_steps(stepper, optimizer=opt.name, impl=impl, **traffic_info(opt.name, param_set.n_params), **extra)
    stepper.check(params)


# ----------------------------------------------------------------------------- the size sweep

SWEEP_IMPLEMENTATIONS = [*FUNCTRAIN_EAGER, "functrain-compiled", *TORCH_VARIANTS, "torchopt"]


@pytest.mark.benchmark(group="adamw-update")
@pytest.mark.parametrize("impl", [*SWEEP_IMPLEMENTATIONS, "torchopt-accelerated"])
@pytest.mark.parametrize("param_set", SIZE_IDS, indirect=True)
def test_adamw_update(impl, param_set, params, grads, run_steps, bench_config):
    """AdamW(lr=1e-3, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8): one step."""
    run_update(impl, ADAMW, params, grads, run_steps, bench_config, param_set)


@pytest.mark.benchmark(group="sgd-momentum-update")
@pytest.mark.parametrize("impl", SWEEP_IMPLEMENTATIONS)
@pytest.mark.parametrize("param_set", SIZE_IDS, indirect=True)
def test_sgd_momentum_update(impl, param_set, params, grads, run_steps, bench_config):
    """SGD(lr=1e-3, momentum=0.9): one step."""
    run_update(impl, SGD_MOMENTUM, params, grads, run_steps, bench_config, param_set)


@pytest.mark.benchmark(group="copy-bandwidth")
@pytest.mark.parametrize("impl", ["copy", "add-inplace"])
@pytest.mark.parametrize("param_set", SIZE_IDS, indirect=True)
def test_copy(impl, param_set, run_steps, bench_config):
    """``dst.copy_(src)`` / ``a.add_(b)`` over flat float32 tensors of the size's element count."""
    n = param_set.n_params

    def values() -> Tensor:
        return torch.randn(n, generator=torch.Generator().manual_seed(2)).to(bench_config.device)

    src, dst = values(), torch.zeros(n, device=bench_config.device)
    # Adding zeros keeps the values: after any number of rounds the written tensor holds values().
    step, written = ((lambda: dst.copy_(src)), dst) if impl == "copy" else ((lambda: src.add_(dst)), src)
    run_steps(step, optimizer=impl, impl=impl, n_tensors=1, **traffic_info(impl, n))
    assert torch.equal(written, values())


# ----------------------------------------------------------------------------- more optimisers, at one size

# Adafactor and Muon have no fused torch.optim kernel; Muon orthogonalises matrices only (torch.optim.Muon
# refuses vectors), so its group takes two matrices of the parameter set; Lion has no torch.optim class.
ONE_SIZE = ["10M"]


@pytest.mark.benchmark(group="adafactor-update")
@pytest.mark.parametrize("impl", ["functrain", "torch-forloop", "torch-foreach"])
@pytest.mark.parametrize("param_set", ONE_SIZE, indirect=True)
def test_adafactor_update(impl, param_set, params, grads, run_steps, bench_config):
    """Adafactor(lr=1e-2): torch.optim's defaults."""
    run_update(impl, ADAFACTOR, params, grads, run_steps, bench_config, param_set)


@pytest.mark.benchmark(group="muon-update")
@pytest.mark.parametrize("impl", ["functrain", "torch-forloop"])
@pytest.mark.parametrize("param_set", ONE_SIZE, indirect=True)
def test_muon_update(impl, param_set, params, grads, run_steps):
    """Muon(lr=1e-3) on two of the matrices: momentum 0.95, Nesterov, 5 Newton-Schulz steps.

    Two, because each 448 x 448 matrix costs ~30 x 448^3 = 2.7 GFLOP of matmuls per step."""
    matrices = dict([(k, v) for k, v in params.items() if v.ndim == 2][:2])
    matrix_grads = {k: grads[k] for k in matrices}
    if impl == "functrain":
        stepper = functrain_stepper(ft.muon(lr=1e-3), matrices, matrix_grads, "fast")
    else:
        stepper = torch_stepper(lambda ps: torch.optim.Muon(ps, lr=1e-3), matrices, matrix_grads)
    n = sum(m.numel() for m in matrices.values())
    run_steps(stepper, optimizer="muon", impl=impl, n_params=n, n_tensors=len(matrices))
    stepper.check(matrices)


@pytest.mark.benchmark(group="lion-update")
@pytest.mark.parametrize("impl", ["functrain", "functrain-compiled"])
@pytest.mark.parametrize("param_set", ONE_SIZE, indirect=True)
def test_lion_update(impl, param_set, params, grads, run_steps, bench_config):
    """Lion(lr=1e-4): no torch.optim class to compare with; eager against compiled."""
    run_update(impl, LION, params, grads, run_steps, bench_config, param_set)
