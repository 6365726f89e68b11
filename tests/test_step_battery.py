"""The registry battery through the training step (issue 15, point 4).

Every registered optimiser, and every combinator or wrapper that changes how optimiser state is
handled, runs through ``make_train_step`` in four modes: pure and ``inplace=True``, eager and
compiled. Each must equal the bare path it stands for: the gradient of the same loss at the same
params, then ``tx.update(grads, opt_state, params, value=loss)`` and ``ft.apply_updates``, all eager.

- eager (pure and in-place): bitwise, step by step (params, optimiser state and reported loss),
  except where the step may run another kernel than the bare path (see ``FUSED_ADAM_RTOL``);
- compiled: to float32 tolerance (inductor fuses and reorders the arithmetic), with no recompile
  after the first step;
- a pure step leaves its input state exactly as it was; an in-place step returns the very tensors
  it was given, holding the new values.

Only the public API is used (``make_train_step``, ``TrainState``, ``tx.init``/``tx.update``,
``apply_updates``, the registry), so these tests hold however the fused apply and donation are
wired inside the library.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

import functrain as ft

from .registry import FRONTIER, SPECS

STEPS = 4
COMPILED_RTOL, COMPILED_ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------- the problem


def make_model(matrices_only: bool = False) -> nn.Module:
    """A tiny float32 MLP; bias-free for optimisers that take matrices only (Muon)."""
    torch.manual_seed(0)
    bias = not matrices_only
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias))


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def make_data(non_finite_at: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` regression batches; at ``non_finite_at`` one target is inf, so that step's loss
    is inf and its gradients are non-finite."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(STEPS)]
    if non_finite_at is not None:
        x, y = data[non_finite_at]
        y = y.clone()
        y[0, 0] = float("inf")
        data[non_finite_at] = (x, y)
    return data


# ----------------------------------------------------------------------------- trees


def snapshot(tree: Any) -> Any:
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    paths, _ = pytree.tree_flatten_with_path(tree)
    return [(pytree.keystr(path), leaf) for path, leaf in paths]


def assert_trees_close(actual: Any, expected: Any, what: str, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Same structure, and leaf by leaf the same dtype and values: bitwise (NaN where NaN) when
    ``rtol`` and ``atol`` are 0."""
    assert pytree.tree_structure(actual) == pytree.tree_structure(expected), what
    for (name, a), (_, e) in zip(named_leaves(actual), named_leaves(expected)):
        if isinstance(e, torch.Tensor):
            tol = (rtol, atol) if e.is_floating_point() else (0.0, 0.0)
            torch.testing.assert_close(
                a, e, rtol=tol[0], atol=tol[1], equal_nan=True, msg=lambda m, name=name: f"{what}{name}: {m}"
            )
        else:
            assert a == e, f"{what}{name}: {a!r} != {e!r}"


def assert_trees_norm_close(actual: Any, expected: Any, what: str, rtol: float, atol: float = COMPILED_ATOL) -> None:
    """Leaf by leaf the same dtype, inf and NaN where the expected leaf has them, and over the
    finite elements ``||a - e|| <= rtol * ||e|| + atol`` (the registry's ``float32_rtol`` measure)."""
    assert pytree.tree_structure(actual) == pytree.tree_structure(expected), what
    for (name, a), (_, e) in zip(named_leaves(actual), named_leaves(expected)):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            assert (a.dtype, a.shape) == (e.dtype, e.shape), f"{what}{name}: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
            finite = torch.isfinite(e)
            torch.testing.assert_close(a[~finite], e[~finite], rtol=0.0, atol=0.0, equal_nan=True)
            error = (a[finite].double() - e[finite].double()).norm().item()
            bound = rtol * e[finite].double().norm().item() + atol
            assert error <= bound, f"{what}{name}: ||a - e|| = {error:.3g} > {bound:.3g}"
        else:
            assert_trees_close(a, e, f"{what}{name}")


# ----------------------------------------------------------------------------- the two paths


def reference_run(make_tx: Callable[[], ft.GradientTransformation], matrices_only: bool, data: list) -> list[dict]:
    """The bare path, eager: after each step a snapshot of the params, optimiser state and loss.

    The gradient is ``torch.autograd.grad`` of the loss of ``functional_call(model, params)``, of
    ``scale * loss`` when the optimiser is a ``dynamic_loss_scale`` (as the step scales it); the
    optimiser gets the loss as ``value=`` (``reduce_on_plateau`` reads it).
    """
    model = make_model(matrices_only)
    tx = make_tx()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt_state = tx.init(params)
    out = []
    for batch in data:
        inputs = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            x, y = batch
            loss = F.mse_loss(torch.func.functional_call(model, inputs, (x,)), y)
            scaled = loss * opt_state.scale if isinstance(opt_state, ft.LossScaleState) else loss
        grads = dict(zip(inputs, torch.autograd.grad(scaled, list(inputs.values()))))
        loss = loss.detach()
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        params = ft.apply_updates(params, updates)
        out.append(snapshot({"params": params, "opt_state": opt_state, "loss": loss}))
    return out


def step_run(
    make_tx: Callable[[], ft.GradientTransformation],
    matrices_only: bool,
    data: list,
    expected: list[dict],
    *,
    inplace: bool,
    compile: bool,
    check: Callable[[Any, Any, str], None],
) -> None:
    """Runs ``make_train_step`` over ``data`` and checks every step against ``expected`` with
    ``check(actual, expected, what)``, together with purity (pure) or tensor reuse (in-place)."""
    model = make_model(matrices_only)
    model_before = snapshot(dict(model.state_dict()))
    tx = make_tx()
    step = ft.make_train_step(model, mse, tx, inplace=inplace, compile=compile)
    state = ft.TrainState.create(model, tx)
    if inplace:  # the step writes into the state's tensors: keep the model's own out of it
        state = snapshot(state)
    for t, batch in enumerate(data):
        given = pytree.tree_leaves(state)
        before = snapshot(state)
        # A compiled step compiles once, on its first call; any later recompile is a failure.
        stance = torch.compiler.set_stance("fail_on_recompile") if compile and t else contextlib.nullcontext()
        with stance:
            new, metrics = step(state, batch)
        if inplace:
            returned = pytree.tree_leaves(new)
            assert len(returned) == len(given)
            reused = [a is b for a, b in zip(returned, given)]
            assert all(reused), f"step {t}: in-place step returned new tensors at {reused.index(False)}"
        else:
            assert_trees_close(state, before, f"step {t}: pure step changed its input state")
        assert int(new.step) == t + 1
        check(new.params, expected[t]["params"], f"step {t}: params")
        check(new.opt_state, expected[t]["opt_state"], f"step {t}: opt_state")
        check(metrics["loss"], expected[t]["loss"], f"step {t}: loss")
        state = new
    assert_trees_close(dict(model.state_dict()), model_before, "the model's own tensors changed")


def exact(rtol: float = 0.0, atol: float = 0.0) -> Callable[[Any, Any, str], None]:
    return lambda a, e, what: assert_trees_close(a, e, what, rtol=rtol, atol=atol)


def close_compiled(norm_rtol: float | None = None) -> Callable[[Any, Any, str], None]:
    """Compiled vs eager: float32 rounding, element by element; for an optimiser whose registry
    tolerance is looser (Muon's Newton-Schulz in bfloat16, or SOAP's eigenvectors, which amplify
    rounding by its ``rounding_gain``: that times float32's epsilon), that tolerance, as a norm."""
    if norm_rtol is not None and norm_rtol > COMPILED_RTOL:
        return lambda a, e, what: assert_trees_norm_close(a, e, what, norm_rtol)
    return exact(COMPILED_RTOL, COMPILED_ATOL)


_REFERENCES: dict[str, list[dict]] = {}


def reference_for(key: str, make_tx, matrices_only: bool, data: list) -> list[dict]:
    """One reference run per case, shared by its modes (the runs are deterministic)."""
    if key not in _REFERENCES:
        _REFERENCES[key] = reference_run(make_tx, matrices_only, data)
    return _REFERENCES[key]


# ----------------------------------------------------------------------------- the cases

MODES = {
    "pure": dict(inplace=False),
    "inplace": dict(inplace=True),
}

# An eager step may apply Adam and AdamW (alone, or inside a combinator or wrapper that passes the
# fast path on) with torch's fused Adam kernel, while the bare path runs ``tx.update`` (foreach
# kernels) then ``apply_updates``. The two round differently once weight decay is on (the fused
# kernel scales the param by ``1 - lr * wd`` itself): one float32 ulp of the params at the first
# step, which then reaches the moments through the gradient (worst relative error over the cases,
# measured leaf by leaf as a norm: 2.4e-7). Everything else runs the same kernels and is bitwise.
FUSED_ADAM_RTOL = 1e-6
FUSED_ADAM_OPTIMISERS = {"adam", "adamw"}


def eager_check(runs_fused_adam: bool) -> Callable[[Any, Any, str], None]:
    if runs_fused_adam:
        return lambda a, e, what: assert_trees_norm_close(a, e, what, FUSED_ADAM_RTOL, atol=0.0)
    return exact()


def optimiser_cases() -> list:
    out = []
    for spec in SPECS:
        for i, kwargs in enumerate(spec.cases()):
            out.append(pytest.param(spec, i, kwargs, id=f"{spec.name}-{i}"))
    return out


def compiled_optimiser_cases() -> list:
    """One case per optimiser, the one holding the most optimiser state (momentum on, amsgrad on,
    centred, ...): each compile costs seconds, and the option combinations differ in arithmetic,
    which the eager battery checks, more than in the state the step has to carry and write.

    The torch.optim mirrors run in both modes (Adam's in-place step is another kernel). The frontier
    optimisers, which have no in-place form of their own, run in one mode each, taking turns, so
    that both modes are compiled over them at half the compiles (tens of seconds each on CI)."""
    shapes = {k: v.shape for k, v in make_model().named_parameters()}
    out = []
    for spec in SPECS:
        params = {k: torch.zeros(s) for k, s in shapes.items() if not spec.matrices_only or len(s) == 2}
        sizes = [sum(t.numel() for t in pytree.tree_leaves(spec.make(**kw).init(params))) for kw in spec.cases()]
        index = sizes.index(max(sizes))
        modes = [list(MODES)[FRONTIER.index(spec) % len(MODES)]] if spec in FRONTIER else list(MODES)
        for mode in modes:
            out.append(pytest.param(spec, index, spec.cases()[index], mode, id=f"{spec.name}-{index}-{mode}"))
    return out


@pytest.fixture
def fresh_dynamo():
    """Forget what dynamo learnt from the steps compiled before: every ``make_train_step`` shares
    the automatic-dynamic state that dynamo keys by file, line and function name, so a Python float
    that differed between earlier steps (any hyperparameter at the same closure position) is traced
    as a symbolic float in the next one (see the regression test below). The reset keeps each compiled case
    as it would run in a process of its own; it drops no on-disk cache."""
    torch._dynamo.reset()


def compiled_rtol(spec) -> float:
    """The registry's float32 tolerance, or the rounding SOAP-like maths amplifies (``rounding_gain``
    float32 epsilons), whichever is larger."""
    return max(spec.float32_rtol, spec.rounding_gain * torch.finfo(torch.float32).eps)


def check_optimiser_step(spec, index, kwargs, mode, compiled):
    """The optimiser's step over ``make_data()`` in ``mode``, step by step against its bare reference."""
    data = make_data()
    make = lambda: spec.make(**kwargs)  # noqa: E731
    expected = reference_for(f"{spec.name}-{index}", make, spec.matrices_only, data)
    check = close_compiled(compiled_rtol(spec)) if compiled else eager_check(spec.name in FUSED_ADAM_OPTIMISERS)
    step_run(make, spec.matrices_only, data, expected, compile=compiled, check=check, **MODES[mode])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("spec,index,kwargs", optimiser_cases())
def test_optimiser_eager_step_equals_bare_update(spec, index, kwargs, mode):
    check_optimiser_step(spec, index, kwargs, mode, compiled=False)


@pytest.mark.slow
@pytest.mark.parametrize("spec,index,kwargs,mode", compiled_optimiser_cases())
def test_optimiser_compiled_step_equals_bare_update(spec, index, kwargs, mode, fresh_dynamo):
    check_optimiser_step(spec, index, kwargs, mode, compiled=True)


# ----------------------------------------------------------------------------- wrappers


def _is_matrix(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 2


def _group(name: str, p: torch.Tensor) -> str:
    if p.ndim == 2:
        return "weights"
    return "frozen" if name == "0.bias" else "biases"


def _schedule(count: torch.Tensor) -> torch.Tensor:
    return 1e-2 * 0.7 ** count.to(torch.float64)


@dataclass(frozen=True)
class Wrapped:
    make: Callable[[], ft.GradientTransformation]
    runs_adam: bool  # Adam(W) inside: an eager step may run it as torch's fused kernel (FUSED_ADAM_RTOL)
    non_finite_at: int | None = None  # a batch whose loss and gradients are inf / NaN


WRAPPERS: dict[str, Wrapped] = {
    "chain-clip-adamw": Wrapped(
        lambda: ft.chain(ft.clip_by_global_norm(0.5), ft.adamw(lr=1e-2, weight_decay=0.1)), runs_adam=True
    ),
    "chain-clip-sgd": Wrapped(lambda: ft.chain(ft.clip_by_global_norm(0.5), ft.sgd(lr=0.1, momentum=0.9)), False),
    "named_chain-clip-adamw": Wrapped(
        lambda: ft.named_chain(clip=ft.clip_by_global_norm(0.5), adamw=ft.adamw(lr=1e-2, weight_decay=0.1)),
        runs_adam=True,
    ),
    "partition-with-set_to_zero": Wrapped(
        lambda: ft.partition(
            {
                "weights": ft.adamw(lr=1e-2, weight_decay=0.1),
                "biases": ft.sgd(lr=0.1, momentum=0.9),
                "frozen": ft.set_to_zero(),
            },
            _group,
        ),
        runs_adam=True,
    ),
    "masked": Wrapped(
        lambda: ft.chain(
            ft.masked(ft.adamw(lr=1e-2, weight_decay=0.1), _is_matrix),
            ft.masked(ft.sgd(lr=0.1, momentum=0.9), lambda name, p: not _is_matrix(name, p)),
        ),
        runs_adam=True,
    ),
    "inject_hyperparams-adamw-schedule": Wrapped(
        lambda: ft.inject_hyperparams(ft.adamw)(lr=_schedule, weight_decay=0.1), runs_adam=True
    ),
    "accumulate-adamw": Wrapped(lambda: ft.accumulate(ft.adamw(lr=1e-2, weight_decay=0.1), every=2), runs_adam=True),
    "apply_if_finite-adamw-inf-batch": Wrapped(
        lambda: ft.apply_if_finite(ft.adamw(lr=1e-2, weight_decay=0.1), max_consecutive_errors=3),
        runs_adam=True,
        non_finite_at=2,
    ),
    "dynamic_loss_scale-adamw-inf-batch": Wrapped(
        lambda: ft.dynamic_loss_scale(ft.adamw(lr=1e-2, weight_decay=0.1), init_scale=2.0**10, growth_interval=2),
        runs_adam=True,
        non_finite_at=2,
    ),
    "ema_params-after-adamw": Wrapped(
        lambda: ft.chain(ft.adamw(lr=1e-2, weight_decay=0.1), ft.ema_params(0.9)), runs_adam=True
    ),
    "lookahead-adamw": Wrapped(
        lambda: ft.lookahead(ft.adamw(lr=1e-2, weight_decay=0.1), sync_period=2, alpha=0.5), runs_adam=True
    ),
    "reduce_on_plateau-after-sgd": Wrapped(
        # threshold=0.5, patience=0: no step improves the loss by half, so the scale halves every step.
        lambda: ft.chain(ft.sgd(lr=0.1, momentum=0.9), ft.reduce_on_plateau(factor=0.5, patience=0, threshold=0.5)),
        runs_adam=False,
    ),
}


def wrapper_cases() -> list:
    return [pytest.param(name, id=name) for name in WRAPPERS]


def wrapper_reference(name: str) -> tuple[list, list[dict]]:
    w = WRAPPERS[name]
    data = make_data(w.non_finite_at)
    return data, reference_for(name, w.make, False, data)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", wrapper_cases())
def test_wrapper_eager_step_equals_bare_update(name, mode):
    data, expected = wrapper_reference(name)
    w = WRAPPERS[name]
    step_run(w.make, False, data, expected, compile=False, check=eager_check(w.runs_adam), **MODES[mode])


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", wrapper_cases())
def test_wrapper_compiled_step_equals_bare_update(name, mode, fresh_dynamo):
    data, expected = wrapper_reference(name)
    step_run(WRAPPERS[name].make, False, data, expected, compile=True, check=close_compiled(), **MODES[mode])


def test_the_wrapper_references_exercise_what_they_are_for():
    """The battery is not vacuous: every case moves the params; the inf batches give an inf loss
    and a skipped step; the loss scale grows and backs off; the plateau scale drops."""
    start = {k: v.detach() for k, v in make_model().named_parameters()}
    for name, w in WRAPPERS.items():
        _, expected = wrapper_reference(name)
        assert any(not torch.equal(expected[-1]["params"][k], start[k]) for k in start), name
        if w.non_finite_at is not None:
            assert not torch.isfinite(expected[w.non_finite_at]["loss"]), name
            before, after = expected[w.non_finite_at - 1]["params"], expected[w.non_finite_at]["params"]
            assert all(torch.equal(before[k], after[k]) for k in before), f"{name}: the inf step was not skipped"
    _, expected = wrapper_reference("dynamic_loss_scale-adamw-inf-batch")
    assert [float(s["opt_state"].scale) for s in expected] == [2.0**10, 2.0**11, 2.0**10, 2.0**10]
    _, expected = wrapper_reference("reduce_on_plateau-after-sgd")
    assert [float(s["opt_state"][1].scale) for s in expected] == [1.0, 0.5, 0.25, 0.125]


# ----------------------------------------------------------------------------- a bug this battery found


@pytest.mark.slow
def test_a_compiled_step_does_not_depend_on_the_steps_compiled_before_it():
    """Every make_train_step copy shares dynamo's automatic-dynamic state (keyed by file/line/name), so
    a float that differed between two steps becomes symbolic in the next; a host-side check of it in a
    traced update (clip_by_global_norm re-validated norm_type) broke fullgraph. Nothing is re-checked
    while tracing now."""
    torch._dynamo.reset()
    batch = make_data()[0]
    for norm_type in (2.0, 3.0):
        model = make_model()
        tx = ft.chain(ft.clip_by_global_norm(0.5, norm_type=norm_type), ft.sgd(lr=0.1))
        step = ft.make_train_step(model, mse, tx, compile={"backend": "eager"})
        step(ft.TrainState.create(model, tx), batch)
