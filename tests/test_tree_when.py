"""``_tree.when``: an optimiser's occasional costly work (SOAP's eigendecompositions, PSGD's refits)
runs only on the steps that need it, compiled as well as eager, and gives the same numbers in every
form (eager, compiled, vmapped with per-model conditions, and without functorch's private test).

The work is a custom op that counts its calls: compiled, it stays an opaque call in the graph, so the
count says which side of the branch the compiled code ran."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from functrain import _tree

_CALLS: list[int] = []


@torch.library.custom_op("functrain_tests::costly", mutates_args=())
def costly(x: Tensor) -> Tensor:
    _CALLS.append(1)
    return (x * 2).mT.contiguous().mT  # column-major, as LAPACK's results are


@costly.register_fake
def _(x):
    return torch.empty_like(x).mT.contiguous().mT


@costly.register_vmap
def _(info, in_dims, x):
    return costly(x), in_dims[0]


def _refresh(condition: Tensor, x: Tensor, q: Tensor) -> tuple:
    """A step that refreshes ``q`` (and moves ``x``) when ``condition`` holds; ``None`` rides along."""
    return _tree.when(condition, lambda: (x + 1, [None, costly(q)]), (x, [None, q]))


def _refresh_tensors(condition: Tensor, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """``_refresh`` without the ``None`` (vmap returns tensors only)."""
    x, (_, q) = _refresh(condition, x, q)
    return x, q


def _both_sides(condition: Tensor, x: Tensor, q: Tensor) -> tuple:
    return _tree.choose(condition, lambda: (x + 1, [None, costly(q)]), lambda: (x, [None, q]))


def _expected(condition: bool, x: Tensor, q: Tensor) -> tuple:
    return (x + 1, [None, q * 2]) if condition else (x, [None, q])


def _assert_same(got, want) -> None:
    assert got[1][0] is None
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1][1], want[1][1], rtol=0, atol=0)


def _calls(fn, *args):
    _CALLS.clear()
    out = fn(*args)
    return out, len(_CALLS)


X, Q = torch.randn(3), torch.randn(4, 4)
COMPILED = torch.compile(_refresh, fullgraph=True, dynamic=False)  # static shapes, as a compiled step's


@pytest.mark.parametrize("condition", [False, True])
def test_compiled_when_runs_the_costly_side_only_when_it_is_taken(condition):
    out, calls = _calls(COMPILED, torch.tensor(condition), X, Q)
    _assert_same(out, _expected(condition, X, Q))
    assert calls == int(condition)
    assert out[0] is not X and out[1][1] is not Q  # fresh tensors: the caller may own the inputs


def test_compiled_choose_by_contrast_runs_both_sides_on_every_step():
    """What ``when`` saves: ``choose``'s torch.where form computes the costly side either way."""
    compiled = torch.compile(_both_sides, fullgraph=True, dynamic=False)
    out, calls = _calls(compiled, torch.tensor(False), X, Q)
    _assert_same(out, _expected(False, X, Q))
    assert calls == 1


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "torchs-default"])
def test_compiled_with_shapes_that_may_be_symbolic_when_merges_both_sides(dynamic):
    """dynamo's torch.cond fails on symbolic sizes (dynamic=True, or torch's default dynamic=None
    after a recompile on new shapes): there both sides run and torch.where picks, same numbers."""
    compiled = torch.compile(lambda c, x, q: _refresh(c, x, q), fullgraph=True, dynamic=dynamic)
    for size in (4, 5):  # dynamic=None: the second size recompiles with symbolic sizes
        q = torch.randn(size, size)
        out, calls = _calls(compiled, torch.tensor(False), X, q)
        _assert_same(out, _expected(False, X, q))
        assert calls == 1


@pytest.mark.parametrize("condition", [False, True])
def test_eager_when_reads_the_condition_and_runs_one_side(condition):
    for given in (condition, torch.tensor(condition)):  # a bool from _tree.decided, or a 0-d tensor
        out, calls = _calls(_refresh, given, X, Q)
        _assert_same(out, _expected(condition, X, Q))
        assert calls == int(condition)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_vmapped_with_a_condition_per_model_each_model_takes_its_own_side(compile):
    """torch.cond cannot batch its predicate: with one condition per model, both sides run and
    torch.where picks, as choose does."""
    conditions, xs, qs = torch.tensor([True, False, True]), torch.randn(3, 3), torch.randn(3, 4, 4)
    vmapped = torch.func.vmap(_refresh_tensors)
    out = (torch.compile(vmapped, fullgraph=True, dynamic=False) if compile else vmapped)(conditions, xs, qs)
    for k in range(3):
        _assert_same((out[0][k], [None, out[1][k]]), _expected(bool(conditions[k]), xs[k], qs[k]))


def test_vmapped_with_one_condition_for_all_models_keeps_the_branch():
    vmapped = torch.compile(torch.func.vmap(_refresh_tensors, in_dims=(None, 0, 0)), fullgraph=True, dynamic=False)
    xs, qs = torch.randn(2, 3), torch.randn(2, 4, 4)
    out, calls = _calls(vmapped, torch.tensor(False), xs, qs)
    assert calls == 0
    torch.testing.assert_close(out[1], qs, rtol=0, atol=0)


def test_without_functorchs_private_batched_test_every_condition_counts_as_batched(monkeypatch):
    """The fallback of a missing ``torch._C._functorch.is_batchedtensor`` (looked up at import, as
    ``_tree._IS_BATCHED``; dynamo itself needs the attribute): choose's form, same numbers."""
    monkeypatch.setattr(_tree, "_IS_BATCHED", None)
    compiled = torch.compile(lambda c, x, q: _refresh(c, x, q), fullgraph=True, dynamic=False)
    out, calls = _calls(compiled, torch.tensor(False), X, Q)
    _assert_same(out, _expected(False, X, Q))
    assert calls == 1
