"""functrain._hoist: per-step scalars computed once under torch.compile, not once per element."""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import functrain as ft
from functrain._hoist import hoist

HOIST_OP = torch.ops.functrain.hoist.default


class RecordingBackend:
    """A torch.compile backend that keeps the ops of each captured graph and runs it eagerly."""

    def __init__(self):
        self.targets: list[object] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.targets += [node.target for node in gm.graph.nodes if node.op == "call_function"]
        return gm.forward


def params_and_grads():
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(5, generator=gen)}
    return params, {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}


def update_twice(tx, params, grads):
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
    return params


def test_outside_compile_returns_the_very_same_objects():
    a, b = torch.tensor(1.0), torch.tensor([2.0])
    assert hoist(a) is a
    out = hoist(a, 3.0, b)
    assert out[0] is a and out[1] == 3.0 and out[2] is b


COSINE = ft.schedules.cosine_annealing_lr(0.1, T_max=10)

# Each transform whose update derives scalars from the step count (bias corrections, schedules).
COUNT_SCALARS = {
    "adamw": lambda: ft.adamw(lr=1e-2, weight_decay=1e-2),
    "nadam": lambda: ft.nadam(lr=1e-2),
    "radam": lambda: ft.radam(lr=1e-2),
    "adafactor": lambda: ft.adafactor(lr=1e-2),
    "schedule_free_adamw": lambda: ft.schedule_free_adamw(lr=1e-2, warmup_steps=3),
    "sgd-cosine-schedule": lambda: ft.sgd(lr=COSINE),
    "adam-injected-schedule": lambda: ft.inject_hyperparams(ft.adam)(lr=COSINE),
}


@pytest.mark.parametrize("name", sorted(COUNT_SCALARS))
def test_count_derived_scalars_go_through_hoist_and_change_nothing(name):
    torch._dynamo.reset()
    params, grads = params_and_grads()
    backend = RecordingBackend()
    compiled = torch.compile(lambda p, g: update_twice(COUNT_SCALARS[name](), p, g), backend=backend, fullgraph=True)
    traced = compiled(params, grads)
    assert HOIST_OP in backend.targets
    # Equal to float32 rounding: eager AdamW runs torch's fused kernel, the traced graph its ops.
    torch.testing.assert_close(traced, update_twice(COUNT_SCALARS[name](), params, grads))


def test_vmapped_over_counts_under_compile():
    def corrected(x, count):
        t = count.to(torch.float64)
        bc1, bc2 = hoist(1 - 0.9**t, (1 - 0.999**t).sqrt())
        return x * (bc2 / bc1).to(x.dtype)

    x, counts = torch.randn(4, 3), torch.tensor([1, 2, 3, 40])
    compiled = torch.compile(torch.vmap(corrected), backend=RecordingBackend(), fullgraph=True)
    torch.testing.assert_close(compiled(x, counts), torch.vmap(corrected)(x, counts), rtol=0, atol=0)


def test_a_scalar_that_carries_a_gradient_is_left_to_autograd():
    def loss(x, count):
        (scale,) = (hoist(x.sum() * count),)  # depends on x: must stay differentiable
        return (scale * x).sum()

    x, count = torch.randn(3), torch.tensor(2.0)
    compiled = torch.compile(torch.func.grad(loss), backend=RecordingBackend(), fullgraph=True)
    torch.testing.assert_close(compiled(x, count), torch.func.grad(loss)(x, count))


@pytest.mark.slow
def test_inductor_computes_adams_bias_corrections_outside_the_vectorised_loops():
    """The performance property itself: no ``pow`` in a kernel that loops over parameter elements."""
    torch._dynamo.reset()
    params, grads = params_and_grads()
    params = {k: v.repeat(64, 1) if v.ndim == 2 else v.repeat(64) for k, v in params.items()}
    grads = {k: v.repeat(64, 1) if v.ndim == 2 else v.repeat(64) for k, v in grads.items()}
    tx = ft.adamw(lr=1e-2, weight_decay=1e-2)
    compiled = torch.compile(lambda p, s, g: tx.update(g, s, p), fullgraph=True)
    _, (code, *_) = run_and_get_code(compiled, params, tx.init(params), grads)
    kernels = re.findall(r'extern "C"(.*?)\'\'\'', code, flags=re.DOTALL)  # each C++ kernel's source
    loops = [k for k in kernels if "Vectorized" in k]
    assert loops, "expected vectorised update kernels in:\n" + code
    assert not [k for k in loops if "pow" in k], "a vectorised kernel still computes pow:\n" + code
