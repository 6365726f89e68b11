"""The compiled step's GEMM selection (functrain/_gemm.py), an opt-in (``compile={"cpu_gemm": "fastest"}``):
each float32 CPU mm/addmm runs on oneDNN where that is measured faster than ATen's BLAS, with the same
result to float32 rounding; any failure of oneDNN's private op falls back to ATen. A default compiled
step runs no timing pass."""

from __future__ import annotations

import subprocess
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

import functrain as ft
from functrain import _gemm
from functrain.step import _with_graph_passes

needs_onednn = pytest.mark.skipif(not _gemm.onednn_available(), reason="torch built without oneDNN")
aten = torch.ops.aten


def relative_error(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def operands(layout):
    """``a`` (5x7) and ``b`` (7x3), each contiguous or a transposed view, and a bias of 3."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g).t() if "a^T" in layout else torch.randn(5, 7, generator=g)
    b = torch.randn(3, 7, generator=g).t() if "b^T" in layout else torch.randn(7, 3, generator=g)
    return a, b, torch.randn(3, generator=g)


@needs_onednn
@pytest.mark.parametrize("layout", ["a b", "a^T b", "a b^T", "a^T b^T"])
def test_onednn_mm_equals_mm_and_addmm_for_every_layout(layout):
    a, b, bias = operands(layout)
    assert relative_error(_gemm.onednn_mm(a, b), torch.mm(a, b)) < 1e-6
    assert relative_error(_gemm.onednn_mm(a, b, bias), torch.addmm(bias, a, b)) < 1e-6


def gemm_nodes(fn, *args):
    graph = make_fx(fn)(*args).graph
    return [n for n in graph.nodes if n.target in (aten.mm.default, aten.addmm.default)]


def test_only_float32_cpu_gemms_with_a_bias_vector_are_candidates():
    a, b, bias = operands("a b")
    accepted = [
        gemm_nodes(torch.mm, a, b)[0],
        gemm_nodes(torch.addmm, bias, a, b)[0],
        gemm_nodes(lambda x, w, c: F.linear(x, w, c), a, b.t().contiguous(), bias)[0],
    ]
    for node in accepted:
        assert _gemm.gemm_operands(node) is not None, node.format_node()
    rejected = [
        gemm_nodes(torch.mm, a.double(), b.double())[0],  # not float32
        gemm_nodes(lambda c, x, y: torch.addmm(c, x, y, beta=0.5), bias, a, b)[0],  # scaled input
        gemm_nodes(torch.addmm, torch.randn(5, 3), a, b)[0],  # a full matrix, not a bias vector
    ]
    for node in rejected:
        assert _gemm.gemm_operands(node) is None, node.format_node()


def rewritten(fn, faster, monkeypatch, *args):
    monkeypatch.setattr(_gemm, "onednn_is_faster", lambda *values: faster)
    gm = make_fx(fn)(*args)
    _gemm.GEMM_PASS(gm.graph)
    gm.recompile()
    return gm


@needs_onednn
def test_pass_rewrites_the_gemms_that_onednn_runs_faster_and_keeps_the_others(monkeypatch):
    a, b, bias = operands("a^T b")

    def fn(a, b, bias):
        return torch.relu(torch.addmm(bias, a, b)) @ b.t()

    fast = rewritten(fn, True, monkeypatch, a, b, bias)
    targets = [n.target for n in fast.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.functrain.onednn_mm.default) == 2
    assert aten.mm.default not in targets and aten.addmm.default not in targets
    assert relative_error(fast(a, b, bias), fn(a, b, bias)) < 1e-6
    kept = rewritten(fn, False, monkeypatch, a, b, bias)
    assert torch.ops.functrain.onednn_mm.default not in [n.target for n in kept.graph.nodes]


@needs_onednn
def test_the_choice_follows_the_timings_once_per_signature(monkeypatch):
    """oneDNN is chosen when its median is at most 0.9x ATen's, and each signature is timed once."""
    timed = []

    def fake_median(fn):
        timed.append(fn)
        return {0: 1.0, 1: 1.0, 2: 0.95, 3: 1.0, 4: 0.85, 5: 1.0}[len(timed) - 1]

    monkeypatch.setattr(_gemm, "_median_seconds", fake_median)
    monkeypatch.setattr(_gemm, "_CHOICES", {})
    shapes = [torch.empty(4, n) for n in (5, 6, 7)]
    b = [torch.empty(t.shape[1], 2) for t in shapes]
    # oneDNN is timed first, then ATen: a tie, 0.95x and 0.85x.
    assert [_gemm.onednn_is_faster(a, w, None) for a, w in zip(shapes, b)] == [False, False, True]
    assert _gemm.onednn_is_faster(shapes[2], b[2], None) is True
    assert len(timed) == 6


def test_a_long_gemm_is_timed_once_after_its_warm_up():
    """Timing a big GEMM seven times would add seconds to a compile; a call over 10 ms is steady."""
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.011)

    assert _gemm._median_seconds(slow) >= 0.011 and len(calls) == 2
    calls.clear()
    _gemm._median_seconds(lambda: calls.append(1))
    assert len(calls) == 1 + _gemm._TIMED_CALLS


@needs_onednn
def test_timing_an_expanded_operand_keeps_its_strides(monkeypatch):
    """The timed operands copy each GEMM's shape and strides, a broadcast (stride-0) one included."""
    monkeypatch.setattr(_gemm, "_CHOICES", {})
    a, b = torch.randn(1, 7).expand(5, 7), torch.randn(7, 3)
    seen = []
    real = _gemm._onednn

    def spy(x, y, bias):
        seen.append((x.stride(), y.stride()))
        return real(x, y, bias)

    monkeypatch.setattr(_gemm, "_onednn", spy)
    assert isinstance(_gemm.onednn_is_faster(a, b, None), bool)
    assert set(seen) == {((0, 1), (3, 1))}
    assert relative_error(_gemm.onednn_mm(a, b), torch.mm(a, b)) < 1e-6


def broken_onednn(monkeypatch, how):
    """Replaces ``torch.ops.mkldnn`` by a namespace whose ``_linear_pointwise`` raises, or lacks it."""

    def raises(*args):
        raise RuntimeError("mkldnn linear: unsupported layout")

    namespace = types.SimpleNamespace(_linear_pointwise=raises) if how == "raises" else types.SimpleNamespace()
    monkeypatch.setattr(torch.ops, "mkldnn", namespace)


@pytest.mark.parametrize("how", ["raises", "missing"])
def test_onednn_mm_computes_on_aten_when_the_private_op_fails(monkeypatch, how):
    """A graph compiled where oneDNN's op worked still runs, bit for bit as ATen, where it does not."""
    a, b, bias = operands("a^T b")
    broken_onednn(monkeypatch, how)
    assert torch.equal(_gemm.onednn_mm(a, b), torch.mm(a, b))
    assert torch.equal(_gemm.onednn_mm(a, b, bias), torch.addmm(bias, a, b))


@pytest.mark.parametrize("how", ["raises", "missing"])
def test_a_gemm_whose_onednn_timing_fails_stays_on_aten(monkeypatch, how):
    """Timing oneDNN on a signature raises: ATen is chosen, and the pass leaves the graph's GEMMs alone."""
    monkeypatch.setattr(_gemm, "_CHOICES", {})
    a, b, bias = operands("a b")
    broken_onednn(monkeypatch, how)
    assert _gemm.onednn_is_faster(a, b, None) is False
    assert _gemm.onednn_is_faster(a, b, bias) is False

    def fn(a, b, bias):
        return torch.relu(torch.addmm(bias, a, b)) @ b.t()

    monkeypatch.setattr(_gemm, "onednn_available", lambda: True)  # a raising op still looks available
    gm = make_fx(fn)(a, b, bias)
    _gemm.GEMM_PASS(gm.graph)
    gm.recompile()
    assert torch.ops.functrain.onednn_mm.default not in [n.target for n in gm.graph.nodes]
    assert torch.equal(gm(a, b, bias), fn(a, b, bias))


def test_default_compile_options_run_no_timing_pass():
    """Without the opt-in nothing is timed: the options reach torch.compile as given (a bitwise
    reproducible step, DESIGN.md 2a)."""
    for options in ({"fullgraph": True}, {"mode": "max-autotune"}, {"dynamic": True, "options": {"trace.enabled": 0}}):
        assert _with_graph_passes(options, sharded=False) == options
        assert _with_graph_passes({**options, "cpu_gemm": "aten"}, sharded=False) == options


def test_the_opt_in_rides_on_the_compile_options_and_a_mode_becomes_its_options():
    given = {"fullgraph": True, "cpu_gemm": "fastest"}
    expected = {"fullgraph": True, "options": {"post_grad_custom_post_pass": _gemm.GEMM_PASS}}
    assert _with_graph_passes(given, sharded=False) == expected
    assert given == {"fullgraph": True, "cpu_gemm": "fastest"}  # the caller's dict is left alone
    autotuned = _with_graph_passes({"mode": "max-autotune", "cpu_gemm": "fastest"}, sharded=False)
    assert "mode" not in autotuned
    assert autotuned["options"] == {
        **torch._inductor.list_mode_options("max-autotune"),
        "post_grad_custom_post_pass": _gemm.GEMM_PASS,
    }
    # A post-grad pass the caller set themselves (None: none) is respected.
    for own in (None, _gemm.FasterGemms()):
        options = {"cpu_gemm": "fastest", "options": {"post_grad_custom_post_pass": own}}
        assert _with_graph_passes(options, sharded=False)["options"] == {"post_grad_custom_post_pass": own}
    assert _with_graph_passes({"backend": "eager", "cpu_gemm": "fastest"}, sharded=False) == {"backend": "eager"}
    both = {"mode": "max-autotune", "options": {"max_autotune": True}}  # torch.compile refuses this
    assert _with_graph_passes({**both, "cpu_gemm": "fastest"}, sharded=False) == both


@pytest.mark.parametrize("value", ["onednn", "Fastest", None, True])
def test_an_unknown_cpu_gemm_names_the_key_and_the_allowed_values(value):
    with pytest.raises(ValueError, match=r"compile\['cpu_gemm'\] must be one of \('aten', 'fastest'\)"):
        _with_graph_passes({"cpu_gemm": value}, sharded=False)
    with pytest.raises(ValueError, match=r"compile\['cpu_gemm'\]"):
        ft.make_train_step(mlp(), regression, ft.sgd(lr=0.1), compile={"cpu_gemm": value})


def test_importing_functrain_leaves_inductor_unimported():
    """Importing inductor takes over a second; only building a compiled step should pay for it."""
    code = "import sys, functrain; print('torch._inductor' in sys.modules, 'torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def regression(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


@needs_onednn
@pytest.mark.slow
@pytest.mark.parametrize("cpu_gemm", ["fastest", "default"])
def test_compiled_step_with_onednn_gemms_equals_the_eager_step(cpu_gemm, monkeypatch):
    """Opted in and forced onto oneDNN, all 8 GEMMs of a 3-layer MLP's step leave ATen and the step
    still equals the eager one to float32 rounding; by default no GEMM is rewritten."""
    monkeypatch.setattr(_gemm, "onednn_is_faster", lambda *values: True)
    model, tx = mlp(), ft.adamw(lr=1e-2)
    compile = {"cpu_gemm": "fastest"} if cpu_gemm == "fastest" else True
    step = ft.make_train_step(model, regression, tx, compile=compile)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 12, generator=g), torch.randn(16, 4, generator=g)) for _ in range(4)]
    compiled = eager = ft.TrainState.create(model, tx)
    eager_step = ft.make_train_step(model, regression, tx)
    # Inductor's caches would serve a graph compiled with the other choice; compile afresh.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        (compiled, _), (code,) = run_and_get_code(step, compiled, data[0])
    calls = code.count("torch.ops.functrain.onednn_mm.default(")
    assert calls == (8 if cpu_gemm == "fastest" else 0)
    eager, _ = eager_step(eager, data[0])
    for batch in data[1:]:
        compiled, _ = step(compiled, batch)
        eager, _ = eager_step(eager, batch)
    for name in eager.params:
        assert relative_error(compiled.params[name], eager.params[name]) < 1e-5, name


@needs_onednn
@pytest.mark.slow
def test_a_dynamic_shape_step_keeps_symbolic_gemms_on_aten_and_equals_eager(monkeypatch):
    """With ``dynamic=True`` the batch size is symbolic: such GEMMs cannot be timed, stay on ATen,
    and the step still equals the eager one for two batch sizes."""
    monkeypatch.setattr(_gemm, "onednn_is_faster", lambda *values: True)
    model, tx = mlp(), ft.sgd(lr=0.1)
    step = ft.make_train_step(model, regression, tx, compile={"dynamic": True, "cpu_gemm": "fastest"})
    eager_step = ft.make_train_step(model, regression, tx)
    g = torch.Generator().manual_seed(2)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        for rows in (16, 24):
            batch = (torch.randn(rows, 12, generator=g), torch.randn(rows, 4, generator=g))
            state = ft.TrainState.create(model, tx)
            (compiled, _), codes = run_and_get_code(step, state, batch)
            eager, _ = eager_step(state, batch)
            for name in eager.params:
                assert relative_error(compiled.params[name], eager.params[name]) < 1e-5, name
            assert not any("onednn_mm" in code for code in codes)  # every GEMM has the symbolic batch
